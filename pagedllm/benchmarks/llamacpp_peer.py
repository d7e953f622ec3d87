"""llama.cpp as the CPU peer: llama-cpp-python on the same GGUF file, the same prompt token ids,
the same thread count, greedy, EOS ignored.

It runs in a child process of whichever Python has llama-cpp-python (`--peer-python`), so it can
live in its own virtual environment; it is an optional extra, never part of set-up or CI:

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python     # builds llama.cpp, ~3-5 minutes

The child reads {"model", "threads", "prompts", "output_len"} as JSON on stdin and prints
{"seconds", "prompt_seconds", "decode_seconds"}: one sequence at a time (the high-level API has no
batching), each prompt evaluated in one call, then output_len greedy tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

INSTALL_HINT = (
    'llama-cpp-python is not installed for {python}. Install it (it builds llama.cpp, ~3-5 minutes): '
    'CMAKE_ARGS="-DGGML_NATIVE=ON" {python} -m pip install llama-cpp-python -- or in a separate virtual '
    "environment, named with --peer-python"
)

# Runs in the child; standard library and llama_cpp only.
_CHILD = r"""
import json, sys, time
import llama_cpp

job = json.load(sys.stdin)
llm = llama_cpp.Llama(job["model"], n_ctx=job["n_ctx"], n_threads=job["threads"], n_threads_batch=job["threads"],
                      n_batch=512, verbose=False)
def run(prompt, n):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for _ in range(n):
        token = llm.sample(top_k=1, temp=0.0)
        llm.eval([token])
    return t1 - t0, time.perf_counter() - t1
run(job["prompts"][0], 4)  # warm-up
prompt_s = decode_s = 0.0
for p in job["prompts"]:
    a, b = run(p, job["output_len"])
    prompt_s += a
    decode_s += b
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
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([python, "-c", _CHILD], input=json.dumps(job), capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the llama.cpp peer failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def default_python() -> str:
    return sys.executable
