#!/usr/bin/env bash
# One GPU call after the GGUF parts are in /tmp/g: correctness (attention and fused kernels,
# the bundled model vs HF, async on/off equality on the GPU), then benchmarks. Results in $OUT.
#   SHAPES="smollm2-135m llama-1b llama-8b" MODES="on off" bash scripts/gpu_round.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PAGEDLLM_NO_PROGRESS=1 PAGEDLLM_LOG_LEVEL=WARNING
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
cat /tmp/g/gguf.part0* > /tmp/g/smollm2.gguf
status=0
echo "== fused and attention kernels vs torch"; python scripts/gpu_kernels.py ${KERNEL_ARGS:-} 2>&1 | grep -v -i warn | tail -${KERNEL_TAIL:-40} || status=1
echo "== bundled model vs HF"; python scripts/gpu_e2e.py --gguf /tmp/g/smollm2.gguf 2>&1 | grep "PASS\|FAIL\|chat" || status=1
echo "== async on/off equality (tests/test_async_scheduling.py on the GPU)"
PAGEDLLM_TEST_MODEL=/tmp/g/smollm2.gguf python -m pytest -q -x -p no:cacheprovider tests/test_async_scheduling.py 2>&1 | tail -3 || status=1
if [ -n "${STRUCTURED:-}" ]; then
    echo "== structured outputs: JSON-schema batch against unconstrained"
    python -m pagedllm.benchmarks.structured --model /tmp/g/smollm2.gguf --output-json "${OUT:-.}/structured.jsonl" 2>&1 | grep -v -i warn | tail -8 || status=1
fi
MODES=${MODES:-on} bash scripts/gpu_async_ab.sh ${SHAPES:-} || status=1
exit $status
