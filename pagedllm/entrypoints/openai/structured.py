"""A request's output constraint, from whichever field carries it: OpenAI's
`response_format`, vLLM's `structured_outputs`, or vLLM's older `guided_*` fields.
Checked here, without the tokenizer, so a bad schema is a 400 with the compiler's
message before anything reaches the engine."""

from __future__ import annotations

from typing import Any

from pagedllm.entrypoints.openai.errors import BadRequestError
from pagedllm.entrypoints.openai.protocol import SamplingFields
from pagedllm.sampling_params import StructuredOutputsParams


def structured_outputs_from(request: SamplingFields) -> tuple[StructuredOutputsParams | None, str | None]:
    """(the constraint or None, the request field it came from)."""
    found: list[tuple[str, dict[str, Any]]] = []
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise BadRequestError(
                "response_format of type json_schema needs json_schema.schema (a JSON schema)", param="response_format"
            )
        found.append(("response_format", {"json": fmt.json_schema.json_schema}))
    if request.structured_outputs is not None:
        so = request.structured_outputs
        given = {"json": so.json_, "regex": so.regex, "choice": so.choice, "grammar": so.grammar, "json_object": so.json_object}
        found.append(("structured_outputs", {k: v for k, v in given.items() if v is not None}))
    guided = {"json": request.guided_json, "regex": request.guided_regex, "choice": request.guided_choice, "grammar": request.guided_grammar}
    for key, value in guided.items():
        if value is not None:
            found.append((f"guided_{key}", {key: value}))
    if not found:
        return None, None
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise BadRequestError(f"give one output constraint, not several ({names})", param=found[1][0])
    param, fields = found[0]
    return make_structured_outputs(fields, param), param


def make_structured_outputs(fields: dict[str, Any], param: str) -> StructuredOutputsParams:
    """StructuredOutputsParams from its fields, checked by the grammar compiler (400 if bad)."""
    from pagedllm.structured_output.grammar import validate  # xgrammar loads at the first use

    try:
        params = StructuredOutputsParams(**fields)
        validate(params)
    except ValueError as e:
        raise BadRequestError(str(e), param=param) from e
    return params
