"""Every environment variable pagedllm reads, in one place.

Imported first by the package: OMP_WAIT_POLICY must be set before torch starts
its OpenMP runtime.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting starve every other process on the cores:
# the server's HTTP process, a second engine, the test runner. Measured on the 2-core
# CI machine under load: bf16 decode 1.5 tok/s spinning vs 18 tok/s passive.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PAGEDLLM_LOG_LEVEL = os.environ.get("PAGEDLLM_LOG_LEVEL", "INFO").upper()
PAGEDLLM_NO_PROGRESS = os.environ.get("PAGEDLLM_NO_PROGRESS") == "1"  # no progress bars
PAGEDLLM_API_KEY = os.environ.get("PAGEDLLM_API_KEY")
