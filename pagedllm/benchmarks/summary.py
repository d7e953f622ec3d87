"""A Markdown table from the JSON lines of `bench all --peer vllm` and `bench profile`:

    python -m pagedllm.benchmarks.summary bench.jsonl

One row per model: throughput (ours / vLLM, output tok/s, and our ratio: > 1 means faster than
vLLM), ms per step at each latency batch size, start-up; then the profiles' GPU-idle shares.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def load(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().startswith("{")]


def table(records: list[dict]) -> str:
    ours: dict[str, dict[str, dict]] = defaultdict(dict)  # model -> workload -> record (the last one wins)
    peer: dict[str, dict[str, dict]] = defaultdict(dict)
    profiles = [r for r in records if r.get("kind") == "profile-summary"]
    for r in records:
        if "engine" not in r:
            continue
        (ours if r["engine"] == "pagedllm" else peer)[r["model"]][r["workload"]] = r
    latency_names = sorted({w for by in ours.values() for w in by if w.startswith("latency")}, key=_batch_size)
    machines = sorted({r["machine"] for by in ours.values() for r in by.values()})
    lines = [f"Machine: {', '.join(machines) or '?'}; peer: "
             f"{', '.join(sorted({r['engine'] for by in peer.values() for r in by.values()})) or 'none (vLLM missing or failed)'}",
             "",
             "| model | throughput, ours / peer (output tok/s) | ratio | "
             + " | ".join(f"{_label(w)} ms/step, ours / peer" for w in latency_names) + " | start-up ours / peer (s) |",
             "| --- | --- | --- | " + " | ".join("---" for _ in latency_names) + " | --- |"]
    for model, by in ours.items():
        throughput = next((w for w in by if w.startswith("throughput")), None)
        cells = [model]
        if throughput:
            mine, theirs = by[throughput], peer[model].get(throughput)
            cells += [f"{mine['output_tok_s']:,.0f} / {_get(theirs, 'output_tok_s', '{:,.0f}')}",
                      f"{mine['ratio']:.2f}" if theirs and "ratio" in mine else "-"]
        else:
            cells += ["-", "-"]
        for w in latency_names:
            mine, theirs = by.get(w), peer[model].get(w)
            cells.append(f"{_get(mine, 'ms_per_step', '{:.2f}')} / {_get(theirs, 'ms_per_step', '{:.2f}')}")
        some_ours = next(iter(by.values()))
        some_peer = next(iter(peer[model].values()), None)
        cells.append(f"{some_ours['startup_s']} / {_get(some_peer, 'startup_s', '{}')}")
        lines.append("| " + " | ".join(cells) + " |")
    for p in profiles:
        idle = p.get("decode_idle_share_vs_unprofiled")
        lines += ["", f"Profile {p['model']}, batch {p['batch_size']} ({p['input_len']} in, {p['output_len']} out): "
                      f"{p['decode_steps']} decode steps, {p['decode_wall_ms_unprofiled_median']} ms/step unprofiled, "
                      + (f"GPU busy {p['decode_busy_ms_median']} ms/step, GPU idle {idle:.1%} of the step "
                         f"({p['decode_idle_share_median']:.1%} of the profiled step)" if idle is not None else "no GPU")]
        for k in p.get("top_decode_kernels", [])[:5]:
            lines.append(f"    {k['total_ms']:9.3f} ms {k['calls']:6d} calls  {k['kernel']}")
    return "\n".join(lines)


def _batch_size(workload: str) -> int:
    return int(workload.split("-bs")[1].split("-")[0])


def _label(workload: str) -> str:
    return f"batch {_batch_size(workload)}"


def _get(record: dict | None, key: str, fmt: str) -> str:
    return fmt.format(record[key]) if record and record.get(key) is not None else "-"


if __name__ == "__main__":
    print(table(load(sys.argv[1])))
