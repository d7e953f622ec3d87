#!/bin/bash
# Trace TP=2 llama-8b decode steps on rank 0 and rank 1 (batch 1, then batch 64) and summarize:
# GPU busy against wall, host launch and wait, NCCL kernel time per step (scripts/trace_summary.py).
#   PYTHONPATH=. OUT=/tmp/out bash scripts/gpu_tp_trace.sh
for bs in 1 64; do
  rm -rf /tmp/tptrace
  PAGEDLLM_TORCH_PROFILER_DIR=/tmp/tptrace PAGEDLLM_PROFILE_STEPS=120:160 python3 -m pagedllm.benchmarks.offline latency \
    --model-config llama-8b --tensor-parallel-size 2 --peer none --gpu-memory-utilization 0.85 --batch-sizes $bs 2>&1 | grep -E "ms/step|Error"
  for r in 0 1; do
    python3 scripts/trace_summary.py /tmp/tptrace/rank$r.json | tee -a "$OUT/tp_trace_bs$bs.txt" | head -12
  done
done
