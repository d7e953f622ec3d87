"""Structured outputs: constrain generation to a JSON schema, a regex, a choice or an EBNF
grammar with xgrammar.

    front end:   grammar.validate(params)        tokenizer-free check -> 400 with the compiler's message
    engine core: StructuredOutputManager         compile (thread pool, time limit, cache), one matcher
                                                 per request, the batch's token bitmask each step
    sampler:     layers.sampler.apply_token_bitmask   -inf where the bitmask forbids, on the device

Nothing here is imported by `import pagedllm` or by the scheduler: xgrammar (and its
import time) is paid by the processes that use it, when they first do.
"""
