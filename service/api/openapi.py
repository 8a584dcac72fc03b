"""The OpenAPI document, exact about errors: each operation lists the error statuses it can answer
with, and their bodies (``application/problem+json``; ``{"error": ...}`` on the Open Inference
Protocol surface). Which ones follow from the route itself, in one place:

- 400: a request body that does not parse (JSON, multipart, bundles, ``.npy`` and OIP bodies);
- 404: an id in the path;
- 401: routes that need a key, and routes that declare it (``UNAUTHORIZED``);
- 403: routes that need an admin's, and routes that declare it (``FORBIDDEN``);
- 409, 429: routes that declare them (``CONFLICT``, ``RATE_LIMITED``), and 503 as well (``UNAVAILABLE``);
- 413: a request body (limits);
- 422: parameters or a body;
- 503: routes that need the zoo loaded, predicts refused when the queue is full, and routes that need a
  key (checked in the database, which may be unreachable for a moment: docs/deploy.md);
- 507: routes that store something (every mutating one but predicts), when the disk is full."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from service.api.audit import MUTATING, READS
from service.api.auth import get_admin, get_caller
from service.api.deps import get_ready_services
from service.api.errors import api_routes, is_oip
from zoo_store.methods import get_method, method_names

CONFLICT: dict[int | str, dict[str, Any]] = {409: {"description": "Conflict"}}  # a route's ``responses=``
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {401: {"description": "Unauthorized"}}
UNAVAILABLE: dict[int | str, dict[str, Any]] = {503: {"description": "Unavailable"}}
FORBIDDEN: dict[int | str, dict[str, Any]] = {403: {"description": "Forbidden"}}
RATE_LIMITED: dict[int | str, dict[str, Any]] = {429: {"description": "Too many requests"}}
PROBLEM = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
    },
}
OIP_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
REASONS = {
    400: "Bad request",
    401: "No API key, or one unknown, revoked or expired",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict",
    413: "Payload too large",
    422: "Invalid input",
    429: "Over the tenant's rate limit: see Retry-After",
    503: "Unavailable (loading, the database or the job queue unreachable for a moment, or too many inputs "
    "waiting: see Retry-After)",
    507: "Insufficient storage: the server's disk is full, nothing was stored",
}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for route in api_routes(app):
                if route.include_in_schema:
                    for method in route.methods:
                        _declare_errors(doc["paths"][route.path_format][method.lower()], route, method)
            schemas = doc.get("components", {}).get("schemas", {})
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
            _composition_union(doc)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _declare_errors(op: dict, route: Any, method: str) -> None:
    has_body = route.body_field is not None or "requestBody" in (route.openapi_extra or {})
    codes = set()
    if route.dependant.path_params:
        codes.add(404)
    codes |= {c for c in (401, 403, 409, 429, 503) if c in route.responses}
    if _needs(route, get_caller):
        codes |= {401, 503}  # a key this process has not seen checked in the database, which may be away
        if method in MUTATING and route.path_format not in READS:
            codes.add(507)
    if _needs(route, get_admin):
        codes.add(403)
    if has_body:  # one that does not parse (JSON, multipart, bytes), or one past the limits
        codes |= {400, 413}
    if has_body or route.dependant.query_params or route.dependant.path_params:
        codes.add(422)
    if _needs(route, get_ready_services):
        codes.add(503)
    oip = is_oip(route.path_format)
    media, schema = ("application/json", OIP_ERROR) if oip else ("application/problem+json", PROBLEM)
    for code in sorted(codes):
        op["responses"][str(code)] = {"description": REASONS[code], "content": {media: {"schema": schema}}}


def _needs(route: Any, dependency: Any) -> bool:
    """Whether the route depends on ``dependency``, directly or through another dependency."""
    stack = [route.dependant]
    while stack:
        d = stack.pop()
        if d.call is dependency:
            return True
        stack.extend(d.dependencies)
    return False


def _composition_union(doc: dict) -> None:
    """The task spec as a union discriminated by ``method``: each member the spec's fields, with the
    ones that method needs required, its budget's and options' own schemas, and ``x-zoo-fields``, the
    fields it reads (the server checks the rest against the zoo: a 422 that says why)."""
    schemas = doc["components"]["schemas"]
    spec = schemas.pop("CompositionSpec")
    mapping = {}
    for name in method_names():
        method = get_method(name)
        required = method.required
        props = {k: _not_null(v) if k in required else v for k, v in spec["properties"].items()}
        if method.budget_model is not None:
            props["budget"] = _inline(method.budget_model)
        props["options"] = _inline(method.options) if method.options else {**props["options"], "maxProperties": 0}
        member = {
            **spec,
            "title": f"{name} spec",
            "properties": {**props, "method": {"const": name}},
            "required": ["method", *required],
            "x-zoo-fields": list(method.fields),  # the fields it reads, in a form's order (the dashboard's)
        }
        schemas[f"{name.capitalize()}Spec"] = member
        mapping[name] = f"#/components/schemas/{name.capitalize()}Spec"
    schemas["CompositionSpec"] = {
        "oneOf": [{"$ref": ref} for ref in mapping.values()],
        "discriminator": {"propertyName": "method", "mapping": mapping},
    }


def _inline(model: type[BaseModel]) -> dict:
    """A small model's JSON schema, inline (it has no definitions of its own)."""
    schema = model.model_json_schema()
    assert "$defs" not in schema, model
    return schema


def _not_null(prop: dict) -> dict:
    """A required field's schema without its ``null`` alternative."""
    options = [o for o in prop.get("anyOf", []) if o.get("type") != "null"]
    if len(options) == 1:
        return {**{k: v for k, v in prop.items() if k not in ("anyOf", "default")}, **options[0]}
    return prop
