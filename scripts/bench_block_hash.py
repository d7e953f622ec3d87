"""Host cost of a prefix-cache key per full block: Python's hash() of a tuple (what we
had) against sha256 over packed token ids (what we use), and a whole find_cached_prefix
walk over a cached 2048-token prompt. One JSON line per figure; CPU only.

    PYTHONPATH=. python scripts/bench_block_hash.py [block_size]
"""

from __future__ import annotations

import json
import random
import sys
import timeit

from pagedllm.core.block_hash import hash_block, token_bytes
from pagedllm.core.block_manager import KVCacheManager
from pagedllm.core.request import Request
from pagedllm.sampling_params import SamplingParams


def best_us(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6


def main() -> None:
    bs = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    rng = random.Random(0)
    tokens = [rng.randrange(150_000) for _ in range(2048)]
    block, parent = tokens[:bs], hash_block(None, token_bytes(tokens[:bs]))
    figures = {
        "python_hash_tuple_us": best_us(lambda: hash((123, tuple(block))), 20_000),
        "sha256_key_us": best_us(lambda: hash_block(parent, token_bytes(block)), 20_000),
    }
    kv = KVCacheManager(num_blocks=4096, block_size=bs)
    first = Request("first", tokens, SamplingParams(max_tokens=1))
    kv.allocate_slots(first, len(tokens))
    again = Request("again", tokens, SamplingParams(max_tokens=1))
    num_blocks = (len(tokens) - 1) // bs
    assert len(kv.find_cached_prefix(again)) == num_blocks
    figures["find_cached_prefix_per_block_us"] = best_us(lambda: kv.find_cached_prefix(again), 20) / num_blocks
    for name, value in figures.items():
        print(json.dumps({"metric": name, "block_size": bs, "value": round(value, 3)}))


if __name__ == "__main__":
    main()
