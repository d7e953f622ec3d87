"""Structured outputs vs unconstrained decoding, same engine, same prompts, same run.

    PYTHONPATH=. python -m pagedllm.benchmarks.structured                 # CPU, bundled model
    PYTHONPATH=. python -m pagedllm.benchmarks.structured --output-json $OUT/structured.jsonl   # GPU too

Figures (one JSON line each): output tok/s of a batch of JSON-schema requests and of the
same prompts unconstrained (its ratio is the cost of the grammar: bitmask fill on the host,
masking on the device); the time to first token of a single request with an already
compiled schema against the same request unconstrained (median of several); the first
compile of the schema.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 40},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        "employed": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "hobbies", "employed"],
    "additionalProperties": False,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--ttft-repeats", type=int, default=7)
    parser.add_argument("--output-json", default=None, help="append the JSON lines to this file")
    args = parser.parse_args()

    from pagedllm import LLM, SamplingParams
    from pagedllm.sampling_params import StructuredOutputsParams

    device = "cuda" if torch.cuda.is_available() else "cpu"
    llm = LLM(args.model, dtype="float32" if device == "cpu" else "auto", max_num_seqs=max(args.batch, 8), seed=0,
              **({"kv_cache_memory": "1GiB"} if device == "cpu" else {}))
    tokenizer = llm.get_tokenizer()
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": f"Invent person number {i} and describe them as JSON."}],
                                      add_generation_prompt=True, tokenize=False)
        for i in range(args.batch)
    ]
    constraint = StructuredOutputsParams(json=SCHEMA)
    records = []

    start = time.perf_counter()
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, structured_outputs=constraint), use_tqdm=False)  # compile
    records.append({"metric": "first_compile_and_request_s", "value": round(time.perf_counter() - start, 3)})

    for name, params in [
        # The unconstrained run decodes exactly as many tokens per request as the constrained one
        # produced on average (ignore_eos), so both do the same work apart from the grammar.
        ("json_schema", SamplingParams(temperature=0.8, seed=1, max_tokens=args.max_tokens, structured_outputs=constraint)),
        ("unconstrained", None),
    ]:
        if params is None:
            mean_len = max(1, round(records[-1]["output_tokens"] / args.batch))
            params = SamplingParams(temperature=0.8, seed=1, max_tokens=mean_len, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        record = {"metric": f"batch{args.batch}_{name}_tok_s", "value": round(tokens / elapsed, 1), "output_tokens": tokens, "seconds": round(elapsed, 2)}
        if name == "json_schema":
            record["valid_json"] = sum(_is_json(o.outputs[0].text) for o in outputs)
        records.append(record)
    records.append({"metric": "json_schema_over_unconstrained", "value": round(records[-2]["value"] / records[-1]["value"], 3)})

    ttft = {name: [] for name in ("json_schema", "unconstrained")}
    for i in range(args.ttft_repeats):
        for name, so in [("json_schema", constraint), ("unconstrained", None)]:
            ttft[name].append(_ttft(llm, prompts[i % len(prompts)] + " " * i, SamplingParams(max_tokens=1, structured_outputs=so)))
    for name, values in ttft.items():
        records.append({"metric": f"ttft_{name}_ms", "value": round(statistics.median(values) * 1000, 2)})
    records.append({"metric": "ttft_added_by_compiled_schema_ms", "value": round((statistics.median(ttft["json_schema"]) - statistics.median(ttft["unconstrained"])) * 1000, 2)})

    for record in records:
        record.update(device=device, model=args.model or "bundled SmolLM2-135M-Instruct")
        print(json.dumps(record))
    if args.output_json:
        with open(args.output_json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


def _ttft(llm, prompt: str, params) -> float:
    """Seconds from add_request to the first generated token (one request alone)."""
    engine = llm.engine
    start = time.perf_counter()
    engine.add_request("ttft", prompt, params)
    while True:
        outputs = engine.step()
        if any(o.outputs[0].token_ids for o in outputs):
            elapsed = time.perf_counter() - start
            break
    while engine.has_unfinished_requests():
        engine.step()
    return elapsed


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


if __name__ == "__main__":
    main()
