#!/usr/bin/env bash
# pagedllm beside vLLM 0.26.0 on one GPU machine, in one command (fits the 10-minute device limit):
# for each shape, one `bench all --peer vllm` (vLLM in a child process first: one start-up for
# throughput and both latency batches; then our engine on the same token ids), and the per-step
# GPU-busy profile of llama-1b decode at batch 64. Needs the vLLM bundle unpacked first
# (scripts/gpu_vllm_parts.sh); without it, pagedllm's figures alone.
#   PYTHONPATH=. bash scripts/gpu_bench_all.sh [OUT_DIR]        (default OUT_DIR: $OUT, else .)
# Writes OUT_DIR/bench.jsonl (every figure), OUT_DIR/<shape>.log, OUT_DIR/profile.log, OUT_DIR/summary.md.
# Knobs (defaults in brackets): BENCH_SHAPES ["llama-1b llama-8b smollm2-135m"], BENCH_PROFILE_SHAPE
# [llama-1b; "none" skips], BENCH_BUDGET_S [540: later steps are skipped, not started, once it runs
# out], PAGEDLLM_VLLM_SITE [/tmp/vsite], BENCH_ARGS / PROFILE_ARGS [extra options, e.g. small
# workloads for a CPU smoke run].
set -uo pipefail
out=${1:-${OUT:-.}}
mkdir -p "$out"
shapes=${BENCH_SHAPES:-"llama-1b llama-8b smollm2-135m"}
profile_shape=${BENCH_PROFILE_SHAPE:-llama-1b}
budget=${BENCH_BUDGET_S:-540}
site=${PAGEDLLM_VLLM_SITE:-/tmp/vsite}
export PYTHONUNBUFFERED=1 PAGEDLLM_NO_PROGRESS=1 PAGEDLLM_LOG_LEVEL=${PAGEDLLM_LOG_LEVEL:-WARNING}
export PYTHONPATH=${PYTHONPATH:-.}
python=${PYTHON:-python}
jsonl="$out/bench.jsonl"
status=0
start=$SECONDS

left() { echo $((budget - (SECONDS - start))); }
say() { echo "[$(date -u +%H:%M:%S) +$((SECONDS - start))s] $*"; }

say "machine: $($python -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", torch.__version__)' 2>&1)"
if [ -d "$site/vllm" ]; then
    say "vLLM bundle: $site"
else
    say "no vLLM bundle in $site (bash scripts/gpu_vllm_parts.sh copy 0..3, then unpack): pagedllm runs alone"
fi

run_step() {  # run_step NAME MIN_SECONDS LOG COMMAND...: skipped when the budget left is below MIN_SECONDS
    local name=$1 need=$2 log=$3; shift 3
    local remaining; remaining=$(left)
    if [ "$remaining" -lt "$need" ]; then
        say "SKIP $name: ${remaining}s left of the ${budget}s budget, it needs ~${need}s"
        status=1
        return
    fi
    say "== $name (budget left ${remaining}s)"
    # Progress lines go through as they come; JSON lines stay in the log and in bench.jsonl.
    timeout --kill-after=10 "$remaining" "$@" > >(tee "$log" | grep --line-buffered -v '^{') 2>&1
    local rc=$?
    [ $rc -eq 0 ] || { say "FAILED $name (exit $rc; 124 = out of budget): tail of $log"; tail -n 30 "$log"; status=1; }
}

for shape in $shapes; do
    # The vLLM child gets what is left after keeping ~70 s for our engine on the same workloads.
    peer_timeout=$(( $(left) - 70 )); [ $peer_timeout -gt 300 ] && peer_timeout=300
    run_step "$shape: vLLM then pagedllm (throughput, latency batch 1 and 64)" 120 "$out/$shape.log" \
        $python -m pagedllm.benchmarks.offline all --model-config "$shape" --peer vllm --vllm-site "$site" \
        --peer-timeout "$peer_timeout" --output-json "$jsonl" ${BENCH_ARGS:-}
    if [ "$shape" = "$profile_shape" ]; then
        run_step "$shape: profile, decode at batch 64" 60 "$out/profile.log" \
            $python -m pagedllm.benchmarks.step_profile --model-config "$shape" --quiet-steps \
            --output-json "$jsonl" ${PROFILE_ARGS:-}
    fi
done
if [ "$profile_shape" != none ] && ! grep -qw -- "$profile_shape" <<< "$shapes"; then
    run_step "$profile_shape: profile, decode at batch 64" 60 "$out/profile.log" \
        $python -m pagedllm.benchmarks.step_profile --model-config "$profile_shape" --quiet-steps \
        --output-json "$jsonl" ${PROFILE_ARGS:-}
fi
if [ -f "$jsonl" ]; then
    $python -m pagedllm.benchmarks.summary "$jsonl" > "$out/summary.md" || status=1
    echo; cat "$out/summary.md"
fi
say "done (exit $status)"
exit $status
