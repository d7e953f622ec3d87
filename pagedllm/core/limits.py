"""The one length rule, checked by the front end (early, with a clear error) and by the scheduler."""

from __future__ import annotations


def check_fits(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    if num_prompt_tokens < 1:  # nothing to compute logits from (an empty string tokenizes to no ids)
        raise ValueError("the prompt is empty (it has no tokens): send some text or token ids")
    if num_prompt_tokens >= max_model_len:
        raise ValueError(
            f"prompt has {num_prompt_tokens} tokens, max_model_len is {max_model_len}: shorten the prompt "
            f"to fewer than {max_model_len} tokens or start the engine with a larger max_model_len"
        )
    if num_prompt_tokens + max_tokens > max_model_len:
        raise ValueError(
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {num_prompt_tokens + max_tokens} "
            f"tokens, more than max_model_len ({max_model_len}): lower max_tokens to at most "
            f"{max_model_len - num_prompt_tokens} or shorten the prompt"
        )
