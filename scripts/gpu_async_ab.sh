#!/usr/bin/env bash
# A/B of the engine loop on a GPU: every benchmark shape with async scheduling on and off,
# same machine, same call. JSON lines to $OUT/async_ab.jsonl.
#   PYTHONPATH=. bash scripts/gpu_async_ab.sh [SHAPE ...]
set -uo pipefail
out=${OUT:-.}
export PYTHONUNBUFFERED=1 PAGEDLLM_NO_PROGRESS=1 PAGEDLLM_LOG_LEVEL=${PAGEDLLM_LOG_LEVEL:-WARNING}
shapes=${*:-smollm2-135m llama-1b llama-8b}
status=0
for model in $shapes; do
    for mode in ${MODES:-on off}; do
        for workload in throughput latency; do
            echo "== $workload $model async=$mode"
            python -m pagedllm.benchmarks.offline "$workload" --model-config "$model" --peer none \
                --async-scheduling "$mode" --output-json "$out/async_ab.jsonl" | grep -v '^{' || status=1
        done
    done
done
if [ -n "${PROFILE:-}" ]; then  # where the host time goes: cProfile of a throughput run
    echo "== cProfile throughput $PROFILE"
    python -m cProfile -o "$out/host.prof" -m pagedllm.benchmarks.offline throughput --model-config "$PROFILE" \
        --peer none | grep -v '^{'
    python -c "import pstats, sys; pstats.Stats(sys.argv[1]).sort_stats('tottime').print_stats(40)" "$out/host.prof" \
        | grep -v '^$' | cut -c1-160 | head -60
fi
exit $status
