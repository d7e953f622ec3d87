"""pagedllm's logger: one line per event, to stderr, set up once."""

from __future__ import annotations

import logging

from pagedllm import envs

_configured = False


def init_logging() -> None:
    global _configured
    if _configured:
        return
    _configured = True
    logger = logging.getLogger("pagedllm")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(envs.PAGEDLLM_LOG_LEVEL)
    logger.propagate = False
