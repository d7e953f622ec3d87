#!/usr/bin/env bash
# One GPU call after the GGUF parts are in /tmp/g: correctness (kernels, the bundled model vs
# HF, async on/off equality on the GPU), then the async A/B benchmarks. Results under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PAGEDLLM_NO_PROGRESS=1 PAGEDLLM_LOG_LEVEL=WARNING
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
cat /tmp/g/gguf.part0* > /tmp/g/smollm2.gguf
status=0
echo "== kernels vs torch"; python scripts/gpu_check_attention.py 2>&1 | tail -4 || status=1
echo "== bundled model vs HF"; python scripts/gpu_e2e.py --gguf /tmp/g/smollm2.gguf 2>&1 | grep -v -i warn | tail -8 || status=1
echo "== async on/off equality (tests/test_async_scheduling.py on the GPU)"
PAGEDLLM_TEST_MODEL=/tmp/g/smollm2.gguf python -m pytest -q -x -p no:cacheprovider tests/test_async_scheduling.py 2>&1 | tail -4 || status=1
bash scripts/gpu_async_ab.sh ${SHAPES:-} || status=1
exit $status
