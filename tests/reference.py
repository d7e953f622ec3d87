"""Comparing against HF transformers: greedy tokens with logprobs, and vLLM's
check_logprobs_close rule for near-ties."""

from __future__ import annotations

import torch

from pagedllm.outputs import CompletionOutput


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the log_softmax over the vocab at each step."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt_ids) :].tolist()
    return tokens, [logits[0].float().log_softmax(-1) for logits in out.logits]


def check_logprobs_close(ours: CompletionOutput, hf_tokens: list[int], hf_logprobs: list[torch.Tensor], atol: float = 0.02) -> None:
    """Tokens equal; or at the first difference each side's token is in the other's
    top 5 (a near-tie flipped by float noise), after which the sequences may diverge.
    Where they agree, our logprob of the token is close to HF's."""
    assert ours.logprobs is not None and len(ours.logprobs) >= 1
    for i, (our_token, hf_token) in enumerate(zip(ours.token_ids, hf_tokens)):
        our_lp = ours.logprobs[i]
        if our_token != hf_token:
            hf_top5 = hf_logprobs[i].topk(5).indices.tolist()
            assert our_token in hf_top5, f"step {i}: our token {our_token} not in HF's top 5 {hf_top5}"
            assert hf_token in our_lp, f"step {i}: HF token {hf_token} not in our top logprobs {list(our_lp)}"
            return
        expected = hf_logprobs[i][our_token].item()
        assert abs(our_lp[our_token].logprob - expected) < atol, f"step {i}: logprob {our_lp[our_token].logprob} vs HF {expected}"
