"""Tensor parallelism on CPU: gloo, one worker process per rank.

Two ranks give the greedy tokens and logprobs of one rank (vLLM's logprob-close rule) for every
architecture and for the bundled model (whose 9 heads / 3 KV heads split unevenly); four where
the heads allow it; a model whose KV heads cannot be split is refused with a message that says
why; a killed worker fails the engine within seconds; a server started with
--tensor-parallel-size 2 answers, and SIGTERM leaves none of its processes behind.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import httpx
import pytest
from safetensors.torch import load_file, save_file
from model_utils import build_checkpoint, one_thread, tokenizer_dir  # noqa: F401 (fixtures)
from server_utils import RemoteServer, pid_alive, port_is_free
from test_models import CASES, ENGINE, LLAMA_SHAPE, PROMPTS, checkpoints, vocab  # noqa: F401 (fixtures)
from transformers import LlamaConfig

from pagedllm import LLM, SamplingParams
from pagedllm.outputs import CompletionOutput

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, top_k=50, max_tokens=8, seed=1234, ignore_eos=True)
ARGMAX = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)  # no logprobs: tokens from the ranks' ranges
WORKER_NAME = "pagedllm-tp-worker-"


def check_close(split: CompletionOutput, single: CompletionOutput, atol: float = 1e-3) -> None:
    """Tokens equal; or, at the first difference, each side's token among the other's top
    logprobs (a near-tie flipped by the different summation order), after which they may
    diverge. Where they agree the logprobs are close."""
    for i, (a, b) in enumerate(zip(split.token_ids, single.token_ids)):
        if a != b:
            assert a in single.logprobs[i] and b in split.logprobs[i], f"step {i}: {a} vs {b}, not a near-tie"
            return
        assert abs(split.logprobs[i][a].logprob - single.logprobs[i][b].logprob) < atol, f"step {i}"


def run(folder: str | None, tensor_parallel_size: int, prompts=PROMPTS, params=(GREEDY, SEEDED, ARGMAX), **options) -> list[list]:
    """One engine: the outputs of each SamplingParams over the prompts; its workers stopped after."""
    options = {**ENGINE, **options} if folder is not None else options
    llm = LLM(folder, tensor_parallel_size=tensor_parallel_size, **options)
    try:
        return [llm.generate(prompts, p, use_tqdm=False) for p in params]
    finally:
        llm.engine.core.shutdown()


def worker_processes() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith(WORKER_NAME)]


def compare(single: list[list], split: list[list]) -> None:
    greedy_single, seeded_single, _ = single
    greedy_split, seeded_split, argmax_split = split
    for a, b in zip(greedy_split, greedy_single):
        check_close(a.outputs[0], b.outputs[0])
    # Seeded draws from (all but) the same logits: the same tokens. Every rank also kept them,
    # or the next step's inputs would differ between ranks and the outputs would not match.
    assert [o.outputs[0].token_ids for o in seeded_split] == [o.outputs[0].token_ids for o in seeded_single]
    # Without logprobs, greedy steps pick from each rank's vocabulary range and never gather the
    # logits: the tokens of the same engine's full logits.
    assert [o.outputs[0].token_ids for o in argmax_split] == [o.outputs[0].token_ids for o in greedy_split]


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_match_one(case, checkpoints):
    folder = checkpoints(case)
    compare(run(folder, 1), run(folder, 2))
    assert not worker_processes()


FOUR_RANK_CASES = {
    # 4 heads, and a vocabulary that does not divide by 4: the last rank's rows are padding
    "gpt2-odd-vocab": lambda v: CASES["gpt2"][0](v + 3),
    "llama-4-kv-heads": lambda v: LlamaConfig(vocab_size=v, **{**LLAMA_SHAPE, "num_key_value_heads": 4}),
}


@pytest.mark.parametrize("case", FOUR_RANK_CASES)
def test_four_ranks_where_the_heads_divide(case, tokenizer_dir, vocab, tmp_path):
    folder = build_checkpoint(FOUR_RANK_CASES[case](vocab), str(tmp_path / case), tokenizer_dir)
    compare(run(folder, 1), run(folder, 4))


def test_bundled_model_with_uneven_heads(llm):
    """SmolLM2-135M: 9 heads, 3 KV heads -> ranks hold 2 and 1 KV heads (6 and 3 query heads)."""
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village by the sea, " * 12]
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=5, ignore_eos=True)
    single = llm.generate(prompts, params, use_tqdm=False)  # the session's engine: same options, one rank
    options = dict(dtype="float32", max_num_batched_tokens=128, max_num_seqs=32, kv_cache_memory="256MiB", max_model_len=2048)
    (split,) = run(None, 2, prompts, [params], **options)
    for a, b in zip(split, single):
        check_close(a.outputs[0], b.outputs[0], atol=2e-3)


def test_kv_heads_that_cannot_be_split_are_refused(checkpoints):
    with pytest.raises(ValueError, match=r"tensor_parallel_size 4 is more than the 2 KV heads .* at most 2"):
        LLM(checkpoints("llama"), tensor_parallel_size=4, **ENGINE)
    assert not worker_processes()  # refused before any process started


def test_a_checkpoint_error_in_the_workers_reads_as_with_one_rank(checkpoints, tmp_path):
    folder = tmp_path / "broken"
    os.makedirs(folder)
    for name in os.listdir(checkpoints("opt")):
        if not name.endswith(".safetensors"):
            os.symlink(os.path.join(checkpoints("opt"), name), folder / name)
    state = load_file(os.path.join(checkpoints("opt"), "model.safetensors"))
    del state["model.decoder.layers.1.fc2.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors \['decoder.layers.1.fc2.weight'\]"):
        LLM(str(folder), tensor_parallel_size=2, **ENGINE)
    assert not worker_processes()


def test_killed_worker_fails_the_engine_within_seconds(checkpoints):
    llm = LLM(checkpoints("gpt2"), tensor_parallel_size=2, **ENGINE)
    engine = llm.engine
    engine.add_request("long", "Once upon a time", SamplingParams(max_tokens=200, ignore_eos=True))
    for _ in range(3):
        engine.step()
    (victim,) = [p for p in worker_processes() if p.name == f"{WORKER_NAME}1"]
    os.kill(victim.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"worker rank 1 \(pid {victim.pid}\) died: killed by SIGKILL"):
        while engine.has_unfinished_requests():
            engine.step()
    assert time.monotonic() - start < 10
    assert not worker_processes()  # rank 0 was stopped too
    with pytest.raises(RuntimeError, match="died: killed by SIGKILL"):  # and the engine stays failed
        engine.core.check_health()


def test_worker_dying_while_idle_fails_the_health_check(checkpoints):
    """The server's engine core checks its workers whenever it is idle (core_proc.py)."""
    llm = LLM(checkpoints("gpt2"), tensor_parallel_size=2, **ENGINE)
    llm.engine.core.check_health()
    (victim,) = [p for p in worker_processes() if p.name == f"{WORKER_NAME}0"]
    victim.terminate()
    victim.join(5)
    with pytest.raises(RuntimeError, match=r"worker rank 0 \(pid \d+\) died: killed by SIGTERM"):
        llm.engine.core.check_health()
    assert not worker_processes()


def _descendants(pid: int) -> list[int]:
    found = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        return found
    for child in children:
        found += [child, *_descendants(child)]
    return found


def test_server_with_two_ranks_answers_and_sigterm_leaves_nothing(checkpoints):
    server = RemoteServer(
        [checkpoints("qwen2"), "--tensor-parallel-size", "2", "--dtype", "float32", "--kv-cache-memory", "64MiB"]
    )
    try:
        response = httpx.post(server.url("/v1/completions"), json={"prompt": "Hello", "max_tokens": 4, "ignore_eos": True}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 4
        processes = _descendants(server.process.pid)
        assert len(processes) >= 3  # the engine core and its two workers (and multiprocessing's helper)
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(15)
        deadline = time.monotonic() + 5
        while any(pid_alive(pid) for pid in processes) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in processes if pid_alive(pid)]
        assert port_is_free(server.port)
    finally:
        server.close()
