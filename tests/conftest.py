"""Shared fixtures: the bundled model in pagedllm and in HF transformers (the reference)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("PAGEDLLM_NO_PROGRESS", "1")
if not torch.cuda.is_available():
    # Triton kernels run through its interpreter here. Set before anything imports triton
    # (transformers and accelerate may), since triton.jit reads it when a kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def bundled_gguf() -> str:
    from pagedllm.loader.gguf import find_bundled_model

    return find_bundled_model()


@pytest.fixture(scope="session")
def llm():
    """The bundled model in fp32 with a small step budget, so prompts get chunked."""
    from pagedllm import LLM

    return LLM(dtype="float32", max_num_batched_tokens=128, max_num_seqs=32, kv_cache_memory="256MiB", max_model_len=2048)


@pytest.fixture(scope="session")
def hf_model(bundled_gguf):
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(bundled_gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(autouse=True)
def all_blocks_free_after(request):
    """Every test that ran requests to the end leaves every KV block free."""
    yield
    for name in ("llm", "small_cache_llm"):
        if name in request.fixturenames:
            engine = request.getfixturevalue(name).engine
            assert not engine.has_unfinished_requests()
            kv = engine.core.scheduler.kv
            kv.check_invariants()
            assert kv.num_free_blocks == kv.num_blocks, f"{name}: {kv.num_blocks - kv.num_free_blocks} blocks still in use"
