"""pagedllm: a fast LLM inference and serving engine."""

import pagedllm.envs  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads)
from pagedllm.entrypoints.llm import LLM
from pagedllm.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]
