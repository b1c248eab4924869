"""Parameters that routes parse by hand, and their OpenAPI description.

FastAPI's dependency solving cost `/predict` 0.25-0.45 ms a request in process, beside a
10 ms model. The hot routes validate their query string with one pydantic model
instead, and document the model's fields as OpenAPI parameters, so /docs and the schema
tests still see them.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from tandem.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)

IDEMPOTENCY_HEADER = "Idempotency-Key"
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,128}$")


def query_params(request: Request, model: type[M]) -> M:
    """The query string as `model`; a 422 naming each bad field, as FastAPI's would."""
    params = request.query_params
    items = params.multi_items()
    if len(items) != len(params):
        _refuse_repeated(items)
    try:
        return model.model_validate(dict(params))
    except ValidationError as exc:
        known = ", ".join(model.model_fields)
        errors = [
            {
                **error,
                "loc": ("query", *error["loc"]),
                **({"msg": f"unknown parameter; known: {known}"} if _unknown(error) else {}),
            }
            for error in exc.errors()
        ]
        raise RequestValidationError(errors) from exc


def once_each(request: Request, *names: str) -> None:
    """A 422 if any of `names` is given twice; other parameters (a cache-buster) pass."""
    items = [(name, value) for name, value in request.query_params.multi_items() if name in names]
    if len(items) != len(set(name for name, _ in items)):
        _refuse_repeated(items)


def _refuse_repeated(items: list[tuple[str, str]]) -> None:
    """A parameter given twice is ambiguous (`policy=always&policy=when_unsure`, or two
    callback URLs): one of them had been taken silently."""
    counts = Counter(name for name, _ in items)
    raise RequestValidationError(
        [
            {
                "loc": ("query", name),
                "msg": f"given {count} times; give it once",
                "type": "repeated_parameter",
            }
            for name, count in counts.items()
            if count > 1
        ]
    )


def _unknown(error: ErrorDetails) -> bool:
    return error["type"] == "extra_forbidden"


def idempotency_key(request: Request) -> str | None:
    value = request.headers.get(IDEMPOTENCY_HEADER)
    if value is not None and not _IDEMPOTENCY_KEY.fullmatch(value):
        raise InvalidRequest(f"{IDEMPOTENCY_HEADER} must be 1 to 128 printable ASCII characters")
    return value


def openapi_parameters(model: type[BaseModel], *, idempotent: bool = False) -> list[dict[str, Any]]:
    """`model`'s fields as optional query parameters, and the idempotency header if wanted."""
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})
    parameters = []
    for name, declared in schema["properties"].items():
        field = _inlined(declared, defs)
        description = field.pop("description", "")
        parameters.append(
            {
                "name": name,
                "in": "query",
                "required": False,
                "description": description,
                "schema": field,
            }
        )
    if idempotent:
        parameters.append(
            {
                "name": IDEMPOTENCY_HEADER,
                "in": "header",
                "required": False,
                "description": "A retry with the same key within the result TTL gets the same job.",
                "schema": {"type": "string", "pattern": _IDEMPOTENCY_KEY.pattern},
            }
        )
    return parameters


def _inlined(node: Any, defs: dict[str, Any]) -> Any:
    """`node` with each `$ref` to `defs` replaced by what it names (an enum, here)."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            return _inlined(defs[ref.rsplit("/", 1)[-1]], defs)
        return {key: _inlined(value, defs) for key, value in node.items()}
    if isinstance(node, list):
        return [_inlined(value, defs) for value in node]
    return node
