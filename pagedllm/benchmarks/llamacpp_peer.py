"""llama.cpp as the CPU peer: llama-cpp-python on the same GGUF file, the same prompt token ids,
the same thread count, greedy, EOS ignored.

It runs in a child process of whichever Python has llama-cpp-python (`--peer-python`), so it can
live in its own virtual environment; it is an optional extra, never part of set-up or CI:

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python     # builds llama.cpp, ~3-5 minutes

The child reads {"model", "threads", "prompts", "output_len"} as JSON on stdin and prints
{"seconds", "prompt_seconds", "decode_seconds"}. All the prompts run together, as llama.cpp's
server runs parallel slots: one context with a sequence per prompt, each its own KV stream
(llama.cpp's low-level batch API: `llama_batch` rows tagged with their sequence; a unified cache
would make every token attend over all sequences' cells, masked, 64x the work here), the prompts
evaluated in batches of up to 512 tokens, then one batch a step with every sequence's next token,
greedy (argmax of its logits), EOS ignored. One prompt is llama.cpp's single stream.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pagedllm import envs

INSTALL_HINT = (
    'llama-cpp-python is not installed for {python}. Install it (it builds llama.cpp, ~3-5 minutes): '
    'CMAKE_ARGS="-DGGML_NATIVE=ON" {python} -m pip install llama-cpp-python -- or in a separate virtual '
    "environment, named with --peer-python"
)

# Runs in the child; standard library, numpy and llama_cpp only.
_CHILD = r"""
import json, sys, time
import numpy as np
import llama_cpp as L

job = json.load(sys.stdin)
prompts, out_len, threads = job["prompts"], job["output_len"], job["threads"]
L.llama_backend_init()
model = L.llama_model_load_from_file(job["model"].encode(), L.llama_model_default_params())
n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
params = L.llama_context_default_params()
params.n_ctx = len(prompts) * (max(map(len, prompts)) + out_len + 16)  # split evenly between the sequences
params.n_batch = params.n_ubatch = 512
params.n_seq_max = len(prompts)
params.n_threads = params.n_threads_batch = threads
params.kv_unified = False  # a KV stream per sequence, as llama-server's slots: attention reads its own cells only
ctx = L.llama_init_from_model(model, params)
batch = L.llama_batch_init(max(512, len(prompts)), 0, 1)

def decode(rows):
    # rows: (token, position, sequence, wants logits); returns the argmax of each row that wants them.
    batch.n_tokens = len(rows)
    for i, (token, pos, seq, out) in enumerate(rows):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, out
        batch.seq_id[i][0] = seq
    if L.llama_decode(ctx, batch) != 0:
        raise RuntimeError("llama_decode failed")
    wanted = sum(r[3] for r in rows)
    logits = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(wanted, n_vocab)) if wanted else None
    return [] if logits is None else logits.argmax(axis=1).tolist()

def generate(prompts):
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    t0 = time.perf_counter()
    rows, last = [], {}
    pending = [(t, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, t in enumerate(p)]
    for start in range(0, len(pending), 512):
        chunk = pending[start:start + 512]
        for (_, _, s, _), token in zip([r for r in chunk if r[3]], decode(chunk)):
            last[s] = token
    t1 = time.perf_counter()
    for step in range(out_len - 1):
        tokens = decode([(last[s], len(p) + step, s, True) for s, p in enumerate(prompts)])
        last = dict(enumerate(tokens))
    return t1 - t0, time.perf_counter() - t1

generate([prompts[0][:8]])  # warm-up
prompt_s, decode_s = generate(prompts)
print(json.dumps({"seconds": prompt_s + decode_s, "prompt_seconds": prompt_s, "decode_seconds": decode_s}))
"""


def available(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True)
    return probe.returncode == 0


def run(python: str, gguf_path: str, prompts: list[list[int]], output_len: int, threads: int) -> dict:
    """Seconds llama.cpp takes for the workload (plus its prompt and decode parts)."""
    if not available(python):
        raise RuntimeError(INSTALL_HINT.format(python=python))
    job = dict(model=gguf_path, threads=threads, prompts=prompts, output_len=output_len,
               n_ctx=max(map(len, prompts)) + output_len + 8)
    env = {**envs.peer_environment(), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([python, "-c", _CHILD], input=json.dumps(job), capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the llama.cpp peer failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def default_python() -> str:
    return sys.executable
