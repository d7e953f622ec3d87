"""The offline bench's peers and the step profile, on CPU with the tiny random-weight config.

vLLM itself runs only on the GPU machine (a bundle unpacked on the child's PYTHONPATH), so the
child-process path is exercised here with a stand-in `vllm` package of the same offline API
(LLM, SamplingParams, vllm.inputs.TokensPrompt) that records what it was asked to generate:
what is checked is our side — same token ids and lengths, the child's protocol, figures, ratio,
failure handling — not vLLM."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from pagedllm import envs
from pagedllm.benchmarks import offline, step_profile, summary, workloads
from pagedllm.entrypoints.cli import make_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--model-config", "tiny", "--num-prompts", "4", "--input-len", "8", "16", "--output-len", "4",
         "--kv-cache-memory", "32MiB"]

STAND_IN = '''
import json, os, time
from types import SimpleNamespace
__version__ = "0.0-stand-in"
class SamplingParams:
    def __init__(self, max_tokens, ignore_eos, temperature, detokenize):
        assert ignore_eos and temperature == 0 and not detokenize
        self.max_tokens = max_tokens
class LLM:
    def __init__(self, model, load_format, skip_tokenizer_init, **engine):
        if os.environ.get("STAND_IN_FAIL"):
            raise RuntimeError("stand-in start-up failure")
        assert os.path.isfile(os.path.join(model, "config.json")) and load_format == "dummy"
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(dtype="torch." + engine["dtype"]))
    def generate(self, prompts, params, use_tqdm):
        params = params if isinstance(params, list) else [params] * len(prompts)
        with open(os.environ["STAND_IN_LOG"], "a") as f:
            f.write(json.dumps(dict(prompts=[p["prompt_token_ids"] for p in prompts],
                                    max_tokens=[p.max_tokens for p in params],
                                    omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))) + "\\n")
        time.sleep(0.01)
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[7] * p.max_tokens)]) for p in params]
'''


@pytest.fixture
def stand_in_vllm(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "vllm").mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text(STAND_IN)
    (site / "vllm" / "inputs.py").write_text("def TokensPrompt(prompt_token_ids):\n    return {'prompt_token_ids': prompt_token_ids}\n")
    monkeypatch.setenv("STAND_IN_LOG", str(tmp_path / "calls.jsonl"))
    return site


def _bench(argv: list[str]):
    parser = argparse.ArgumentParser()
    offline.add_arguments(parser)
    return offline.main(parser.parse_args(argv))


def test_vllm_peer_gets_the_same_token_ids_and_both_figures_are_reported(stand_in_vllm, tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    results = _bench(["throughput", *SMALL, "--peer", "vllm", "--vllm-site", str(stand_in_vllm), "--output-json", str(out)])

    expected = workloads.throughput(4, 8, 16, 4, workloads.MODEL_CONFIGS["tiny"]["vocab_size"])
    calls = [json.loads(line) for line in open(tmp_path / "calls.jsonl")]
    # the timed call; OpenMP as the user set it (none in CI), not pagedllm's passive default
    assert calls[-1] == dict(prompts=expected.prompts, max_tokens=expected.output_lens,
                             omp_wait_policy=envs._USER_OMP_WAIT_POLICY)
    assert calls[0]["max_tokens"] == [16] * 4  # the warm-up, as ours

    ours, peer = results
    assert ours["engine"] == "pagedllm" and peer["engine"] == "vllm 0.0-stand-in"
    assert ours["workload"] == peer["workload"] == expected.name
    # The ratio is taken from the unrounded times, the JSON's seconds are rounded to 1 ms (and
    # these runs take ~10 ms): it must lie within what those roundings allow.
    low = (peer["seconds"] - 5e-4) / (ours["seconds"] + 5e-4) - 0.005
    high = (peer["seconds"] + 5e-4) / (ours["seconds"] - 5e-4) + 0.005
    assert low <= ours["ratio"] <= high
    assert ours["peer_ms_per_step"] == peer["ms_per_step"] and peer["startup_s"] is not None
    assert [json.loads(line)["engine"] for line in open(out)] == ["pagedllm", "vllm 0.0-stand-in"]
    printed = capsys.readouterr().out
    assert "vllm 0.0-stand-in:" in printed and "ratio" in printed and "start-up" in printed

    table = summary.table(summary.load(str(out)))
    assert "| tiny |" in table and f"{ours['ratio']:.2f}" in table


def test_hf_peer_on_the_cpu_runs_in_a_child_with_the_users_openmp(monkeypatch):
    """HF in a child process: OMP_WAIT_POLICY there is the user's (here ACTIVE, set before pagedllm
    was imported, as a user would), never pagedllm's PASSIVE; the figures and ratio come back."""
    monkeypatch.setattr(envs, "_USER_OMP_WAIT_POLICY", "ACTIVE")
    assert envs.peer_environment()["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.setattr(envs, "_USER_OMP_WAIT_POLICY", None)
    assert "OMP_WAIT_POLICY" not in envs.peer_environment() and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    (result,) = _bench(["throughput", *SMALL, "--peer", "hf"])
    assert result["peer"] == "hf generate" and result["peer_output_tok_s"] > 0 and result["ratio"] > 0


def test_the_peer_can_run_its_own_dtype(stand_in_vllm):
    """--peer-dtype: vLLM's CPU build at its default bfloat16 beside our float32 run."""
    ours, peer = _bench(["throughput", *SMALL, "--dtype", "float32", "--peer", "vllm", "--vllm-site", str(stand_in_vllm),
                         "--peer-dtype", "bfloat16"])
    assert ours["dtype"] == "float32" and ours["peer_dtype"] == "bfloat16" and peer["dtype"] == "bfloat16"


def test_bench_all_runs_every_workload_with_one_vllm_child(stand_in_vllm, tmp_path):
    results = _bench(["all", *SMALL, "--batch-sizes", "1", "2", "--peer", "vllm", "--vllm-site", str(stand_in_vllm)])
    names = [r["workload"] for r in results if r["engine"] == "pagedllm"]
    assert names[0].startswith("throughput") and names[1:] == ["latency-bs1-32->4", "latency-bs2-32->4"]
    assert all("ratio" in r for r in results if r["engine"] == "pagedllm")
    calls = [json.loads(line) for line in open(tmp_path / "calls.jsonl")]
    assert len(calls) == 2 * 3  # a warm-up and a timed call per workload, all in one child


def test_missing_vllm_prints_the_recipe_and_runs_ours_alone(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PAGEDLLM_VLLM_SITE", raising=False)
    results = _bench(["throughput", *SMALL, "--peer", "vllm", "--vllm-site", str(tmp_path / "nothing")])
    assert [r["engine"] for r in results] == ["pagedllm"] and "ratio" not in results[0]
    printed = capsys.readouterr().out
    assert "vLLM is not importable here" in printed and "gpu_vllm_parts.sh" in printed


def test_a_failing_vllm_child_is_reported_and_ours_still_runs(stand_in_vllm, monkeypatch, capsys):
    monkeypatch.setenv("STAND_IN_FAIL", "1")
    results = _bench(["throughput", *SMALL, "--peer", "vllm", "--vllm-site", str(stand_in_vllm)])
    assert [r["engine"] for r in results] == ["pagedllm"]
    printed = capsys.readouterr().out
    assert "vLLM child exited with code 1" in printed and "stand-in start-up failure" in printed


def test_profile_on_cpu_times_every_step(tmp_path):
    out, trace = tmp_path / "profile.jsonl", tmp_path / "trace.json"
    parser = argparse.ArgumentParser()
    step_profile.add_arguments(parser)
    result = step_profile.main(parser.parse_args([
        "--model-config", "tiny", "--batch-size", "3", "--input-len", "16", "--output-len", "5",
        "--kv-cache-memory", "32MiB", "--output-json", str(out), "--trace", str(trace), "--quiet-steps",
    ]))
    lines = [json.loads(line) for line in open(out)]
    steps = [line for line in lines if line["kind"] == "profile-step"]
    assert lines[-1] == json.loads(json.dumps(result)) and result["steps"] == len(steps)
    assert result["decode_steps"] >= 3 and steps[0]["phase"] == "prefill"
    assert all(s["busy_ms"] is None for s in steps)  # no GPU here
    # The window arithmetic on this real trace, with CPU ops standing in for kernels.
    events = json.load(open(trace))["traceEvents"]
    windows = step_profile.step_windows(events)
    busy = step_profile.busy_per_window(events, windows, frozenset({"cpu_op"}))
    assert len(windows) == len(steps)
    assert all(0 <= b <= end - begin + 1e-6 for b, (begin, end) in zip(busy, windows))
    assert sum(busy) > 0


def test_busy_time_is_the_union_of_device_activity_clipped_to_each_window():
    events = [
        dict(cat="kernel", name="a", ts=0, dur=4), dict(cat="kernel", name="b", ts=2, dur=4),  # overlap: 0..6
        dict(cat="gpu_memcpy", name="c", ts=9, dur=3),  # 9..12 spans two windows
        dict(cat="cpu_op", name="host", ts=0, dur=20),  # not device time
        dict(cat="gpu_user_annotation", name=step_profile.STEP_LABEL, ts=0, dur=20),
    ]
    assert step_profile.busy_per_window(events, [(0, 10), (10, 20), (20, 30)]) == [7, 2, 0]
    events.append(dict(cat="kernel", name="a", ts=25, dur=2))
    assert step_profile.top_kernels(events, [(0, 10), (20, 30)], 5) == [
        dict(kernel="a", calls=2, total_ms=0.006), dict(kernel="b", calls=1, total_ms=0.004)
    ]
    assert step_profile.top_kernels(events, [(20, 30)], 5) == [dict(kernel="a", calls=1, total_ms=0.002)]


def test_bench_cli_parses_all_and_profile():
    parser = make_parser()
    args, rest = parser.parse_known_args(["bench", "all", "--peer", "vllm", "--vllm-site", "/x"])
    assert args.workload == "all" and rest == ["--peer", "vllm", "--vllm-site", "/x"]
    args, rest = parser.parse_known_args(["bench", "profile", "--batch-size", "8"])
    assert args.handler.__name__ == "_profile_bench" and rest == ["--batch-size", "8"]
    sub = argparse.ArgumentParser()
    step_profile.add_arguments(sub)
    defaults = sub.parse_args([])
    assert (defaults.batch_size, defaults.input_len, defaults.output_len) == (64, 512, 128)


def _parts(tmp_path, payload: bytes):
    """A bundle made the way build.sh makes one: a tar.xz of a site folder, split, with its sum."""
    site = tmp_path / "src"
    (site / "vllm").mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_bytes(payload)
    parts = tmp_path / "parts"
    parts.mkdir()
    subprocess.run(f"tar cf - -C {site} . | xz -0 > {tmp_path}/vllm.tar.xz && cd {tmp_path} && sha256sum vllm.tar.xz "
                   f"> {parts}/SHA256SUMS && split -b 200 -d vllm.tar.xz {parts}/part_", shell=True, check=True)
    return parts


def _parts_script(tmp_path, parts, *argv):
    env = {**os.environ, "VLLM_PARTS": str(parts), "VLLM_STAGE": str(tmp_path / "stage"), "VLLM_SITE": str(tmp_path / "site")}
    return subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_vllm_parts.sh"), *argv], env=env,
                          capture_output=True, text=True)


def test_vllm_parts_are_copied_one_by_one_checked_and_unpacked(tmp_path):
    parts = _parts(tmp_path, os.urandom(600))  # incompressible: several parts
    names = sorted(n for n in os.listdir(parts) if n.startswith("part_"))
    assert len(names) >= 3
    assert _parts_script(tmp_path, parts, "check").returncode == 1
    for n in range(len(names) - 1):
        assert _parts_script(tmp_path, parts, "copy", str(n)).returncode == 0
    # One part missing: the sum does not match and nothing is unpacked.
    bad = _parts_script(tmp_path, parts, "unpack")
    assert bad.returncode == 1 and "sha256 mismatch" in bad.stderr
    assert _parts_script(tmp_path, parts, "check").returncode == 1
    missing = _parts_script(tmp_path, parts, "copy", "9")
    assert missing.returncode == 1 and "carry" in missing.stderr
    assert _parts_script(tmp_path, parts, "copy", str(len(names) - 1)).returncode == 0
    os.remove(parts / "SHA256SUMS")  # the sum travelled with the copies: unpack works without it now
    ok = _parts_script(tmp_path, parts, "unpack")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "site" / "vllm" / "__init__.py").read_bytes() == (tmp_path / "src" / "vllm" / "__init__.py").read_bytes()
    assert _parts_script(tmp_path, parts, "check").returncode == 0


@pytest.mark.parametrize("name", ["tiny", "llama-1b"])
def test_parameter_count_without_engine_internals_is_exact(name):
    from types import SimpleNamespace

    from transformers import LlamaConfig

    args = SimpleNamespace(model_config=name, dtype="auto")
    _, vocab, _, count = offline._engine_facts(SimpleNamespace(), args, gpu=False)  # no .engine: the fallback
    config = LlamaConfig(**workloads.MODEL_CONFIGS[name])
    if name == "tiny":  # small enough to build
        from transformers import LlamaForCausalLM

        assert count == LlamaForCausalLM(config).num_parameters()
    else:
        assert count == 1_235_814_400  # Llama-3.2-1B's published size
    assert vocab == config.vocab_size
