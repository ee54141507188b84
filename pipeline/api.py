"""The HTTP contract of ``/predict`` in one place: how a request is read, what an
error looks like, and the OpenAPI 3.0 document served at ``/openapi.json``.

Parsing and the document sit together so that a change to one shows beside the
other; schemathesis runs the document against the live server in the tests,
so a drift between the two fails CI.
"""

from __future__ import annotations

import json
import math
from typing import Any
from urllib.parse import parse_qsl

import werkzeug.urls  # noqa: F401 - registers the "werkzeug.url_quote" error handler parse_query_string uses
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.wrappers import Request, Response

from pipeline.errors import BadRequest, UnprocessableEntity
from pipeline.schema import ENTITY_ID_MAX, ENTITY_KEY_MAX_BYTES, Schema


ARRIVED = "mlops.arrived"  # environ key: when the front received the request (time.monotonic)
BODY = "mlops.body"  # environ key: the whole request body as the front read it (bytes, within its limit)


# ----------------------------------------------------------------- errors
class JSONHTTPException(HTTPException):
    """An HTTP error whose body is JSON (the ``Error`` schema below), never werkzeug's HTML page."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(description=message)
        self.code = code

    def get_body(self, environ=None, scope=None) -> str:
        return json.dumps({"error": self.name, "status": self.code, "message": self.description})

    def get_headers(self, environ=None, scope=None) -> list[tuple[str, str]]:
        return [("Content-Type", "application/json")]


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload), status=status, mimetype="application/json")


# ---------------------------------------------------------------- parsing
def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_entity_id(value: Any, schema: Schema) -> int | str:
    """An entity key from JSON or a query string: a non-negative int64, or for a
    string-keyed data set a non-empty string of at most ENTITY_KEY_MAX_BYTES."""
    key = schema.join_key
    if not schema.int_keys:
        if not isinstance(value, str) or not value.strip():
            raise UnprocessableEntity(f"{key} must be a non-empty string, got {json.dumps(value)[:40]}")
        if len(value.encode("utf-8", "surrogatepass")) > ENTITY_KEY_MAX_BYTES:
            raise UnprocessableEntity(f"{key} must be at most {ENTITY_KEY_MAX_BYTES} bytes")
        return value.strip()
    if isinstance(value, bool) or value is None:
        raise UnprocessableEntity(f"{key} must be an integer, got {json.dumps(value)}")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise UnprocessableEntity(f"{key} must be an integer, got {value!r}")
        value = int(value)
    if isinstance(value, str):
        text = value.strip()
        if not text.isdigit() or not text.isascii():
            raise UnprocessableEntity(f"{key} must be an integer, got {value[:40]!r}")
        significant = text.lstrip("0") or "0"
        if len(significant) > _ENTITY_ID_DIGITS:
            # too long for an int64 (and past Python's int-from-text limit at 4300 digits)
            raise UnprocessableEntity(f"{key} must be between 0 and {ENTITY_ID_MAX}")
        value = int(significant)  # not int(text): leading zeros count towards that limit too
    if not isinstance(value, int):
        raise UnprocessableEntity(f"{key} must be an integer, got a {type(value).__name__}")
    if not 0 <= value <= ENTITY_ID_MAX:
        raise UnprocessableEntity(f"{key} must be between 0 and {ENTITY_ID_MAX}")
    return value


_ENTITY_ID_DIGITS = len(str(ENTITY_ID_MAX))


def _example(schema: Schema) -> str:
    return "1000" if schema.int_keys else '"id-1"'


def parse_body(body: bytes, max_batch: int, schema: Schema) -> tuple[list, bool]:
    """``(entity keys, is_batch)`` from a POST body; raises 400/422 errors."""
    key, example = schema.join_key, _example(schema)
    try:
        payload = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"request body is not valid JSON ({str(exc)[:120]}); send "
                         f'{{"{key}": {example}}} or {{"instances": [{{"{key}": {example}}}]}}') from None
    if not isinstance(payload, dict):
        raise UnprocessableEntity(f"request body must be a JSON object, got a {type(payload).__name__}")
    unexpected = sorted(set(payload) - {key, "instances"})
    if unexpected or len(payload) != 1:
        raise UnprocessableEntity(f'send exactly one of "{key}" or "instances"'
                                  + (f"; unexpected keys: {unexpected[:5]}" if unexpected else ""))
    if key in payload:
        return [parse_entity_id(payload[key], schema)], False
    instances = payload["instances"]
    if not isinstance(instances, list) or not instances:
        raise UnprocessableEntity('"instances" must be a non-empty list of objects')
    if len(instances) > max_batch:
        raise UnprocessableEntity(f'"instances" holds {len(instances)} items; at most {max_batch} per request')
    ids = []
    for i, item in enumerate(instances):
        if not isinstance(item, dict) or set(item) != {key}:
            raise UnprocessableEntity(f'instances[{i}] must be {{"{key}": {example}}}')
        ids.append(parse_entity_id(item[key], schema))
    return ids, True


def parse_query(args, sample_entity, schema: Schema) -> list:
    """The entity of ``GET /predict[?<key>=N]`` from werkzeug's ``request.args``: the sample one when none is given."""
    return _query_entity(set(args), args.getlist(schema.join_key), sample_entity, schema)


def parse_query_string(query_string: str, sample_entity, schema: Schema) -> list:
    """:func:`parse_query` of a WSGI ``QUERY_STRING``, parsed as werkzeug parses ``request.args``
    (without building the request)."""
    if not query_string:
        return _query_entity(set(), [], sample_entity, schema)
    if query_string.isascii() and not any(c in query_string for c in "&%+"):
        # one plain name=value (what a client sends): parse_qsl's answer, without its work
        name, _, value = query_string.partition("=")
        return _query_entity({name}, [value] if name == schema.join_key else [], sample_entity, schema)
    pairs = parse_qsl(query_string.encode("latin1").decode(), keep_blank_values=True, errors="werkzeug.url_quote")
    key = schema.join_key
    return _query_entity({name for name, _ in pairs}, [value for name, value in pairs if name == key],
                         sample_entity, schema)


def _query_entity(names: set, raw: list, sample_entity, schema: Schema) -> list:
    key = schema.join_key
    unexpected = sorted(names - {key})
    if unexpected:
        raise UnprocessableEntity(f"unknown query parameters {unexpected[:5]}; use ?{key}=<key>")
    if len(raw) > 1:
        raise UnprocessableEntity(f"give {key} once, or POST a batch")
    return [parse_entity_id(raw[0], schema)] if raw else [sample_entity]


def _too_large(max_body_bytes: int) -> JSONHTTPException:
    return JSONHTTPException(413, f"request body over {max_body_bytes} bytes; send fewer instances per request")


def _read_until_end(stream, max_body_bytes: int) -> bytes:
    """A body without Content-Length (chunked), read to its end, at most ``max_body_bytes``."""
    parts, size = [], 0
    while True:
        part = stream.read(min(65536, max_body_bytes + 1 - size))
        if not part:
            return b"".join(parts)
        parts.append(part)
        size += len(part)
        if size > max_body_bytes:
            raise _too_large(max_body_bytes)


def parse_request(request: Request, schema: Schema, *, max_batch: int, max_body_bytes: int,
                  sample_entity) -> tuple[list, bool]:
    """``(entity keys, is_batch)`` of a ``/predict`` request, GET or POST."""
    if request.method != "POST":
        return parse_query(request.args, sample_entity, schema), False
    if request.content_length is None and "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        # A chunked body has no Content-Length. The server has taken the chunks apart
        # (PEP 3333), so wsgi.input ends where the body ends; werkzeug would read it
        # as empty, or cut it silently at max_content_length: read it here, whole or 413.
        return parse_body(_read_until_end(request.environ["wsgi.input"], max_body_bytes), max_batch, schema)
    request.max_content_length = max_body_bytes
    try:
        body = request.get_data(cache=False)
    except RequestEntityTooLarge:
        raise _too_large(max_body_bytes) from None
    return parse_body(body, max_batch, schema)


def parse_post(environ: dict, schema: Schema, *, max_batch: int, max_body_bytes: int) -> tuple[list, bool]:
    """:func:`parse_request` of a POST, from its WSGI environ."""
    body = environ.get(BODY)
    if body is not None and len(body) <= max_body_bytes:
        # The front read the body whole (wsgi.input holds the same bytes and Content-Length
        # is their length): what werkzeug would read, without a Request to read it again.
        return parse_body(body, max_batch, schema)
    return parse_request(Request(environ), schema, max_batch=max_batch, max_body_bytes=max_body_bytes,
                         sample_entity=None)


# ---------------------------------------------------------------- OpenAPI
ERROR = {"$ref": "#/components/schemas/Error"}


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": ERROR}}}


def spec(schema: Schema, max_batch: int, max_body_bytes: int) -> dict:
    """The OpenAPI document of this data set's ``/predict``."""
    key = schema.join_key
    entity_id = ({"type": "integer", "minimum": 0, "maximum": ENTITY_ID_MAX} if schema.int_keys else
                 {"type": "string", "minLength": 1, "maxLength": ENTITY_KEY_MAX_BYTES // 4, "pattern": r"\S"})
    features = {
        "type": "object",
        "required": list(schema.feature_names),
        "additionalProperties": False,
        "properties": {f.name: {"type": "number", "description": f.description} for f in schema.features},
    }
    answer = {
        "type": "object",
        "required": [key, "prediction", "features"],
        "properties": {key: entity_id, "prediction": {"type": "number"},
                       "features": {"$ref": "#/components/schemas/Features"}},
    }
    errors = {
        "404": _error("no features in the online store for the entity"),
        "422": _error("well-formed JSON of the wrong shape or type"),
        "503": _error("no model yet, or the online store is unreachable"),
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": f"mlops-shared-volume prediction service: {schema.target} of a {schema.entity}",
                 "version": "1"},
        "paths": {
            "/predict": {
                "get": {
                    "operationId": "predictGet",
                    "summary": "Predict for one entity; without the parameter, for a sample entity.",
                    "parameters": [{"name": key, "in": "query", "required": False,
                                    "schema": entity_id}],
                    "responses": {"200": {"description": "the prediction", "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Single"}}}},
                        **errors},
                },
                "post": {
                    "operationId": "predictPost",
                    "summary": f'Predict for {{"{key}": {_example(schema)}}} or a batch of instances.',
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {
                        "oneOf": [
                            {"type": "object", "required": [key], "additionalProperties": False,
                             "properties": {key: entity_id}},
                            {"type": "object", "required": ["instances"], "additionalProperties": False,
                             "properties": {"instances": {
                                 "type": "array", "minItems": 1, "maxItems": max_batch,
                                 "items": {"type": "object", "required": [key],
                                           "additionalProperties": False,
                                           "properties": {key: entity_id}}}}},
                        ]}}}},
                    "responses": {
                        "200": {"description": "the prediction(s)", "content": {"application/json": {
                            "schema": {"oneOf": [{"$ref": "#/components/schemas/Single"},
                                                 {"$ref": "#/components/schemas/Batch"}]}}}},
                        "400": _error("the body is not valid JSON"),
                        "413": _error(f"the body is over {max_body_bytes} bytes"),
                        **errors,
                    },
                },
            },
            "/healthz": {"get": {"operationId": "healthz", "summary": "Liveness: touches nothing external.",
                                 "responses": {"200": {"description": "alive", "content": {
                                     "application/json": {"schema": {"type": "object"}}}}}}},
            "/readyz": {"get": {"operationId": "readyz",
                                "summary": "Readiness: a model is loaded, the online store answers, every worker is ready.",
                                "responses": {
                                    "200": {"description": "ready", "content": {
                                        "application/json": {"schema": {"$ref": "#/components/schemas/Ready"}}}},
                                    "503": {"description": "not ready, and why", "content": {
                                        "application/json": {"schema": {"$ref": "#/components/schemas/Ready"}}}}}}},
            "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics.",
                                 "responses": {"200": {"description": "text exposition format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        },
        "components": {"schemas": {
            "Features": features,
            "Model": {"type": "object", "required": ["name", "version", "alias"],
                      "properties": {"name": {"type": "string"}, "version": {"type": "integer"},
                                     "alias": {"type": "string"}}},
            "Single": {**answer, "required": [*answer["required"], "model"],
                       "properties": {**answer["properties"], "model": {"$ref": "#/components/schemas/Model"}}},
            "Batch": {"type": "object", "required": ["model", "predictions"],
                      "properties": {"model": {"$ref": "#/components/schemas/Model"},
                                     "predictions": {"type": "array", "items": answer}}},
            "Ready": {"type": "object", "required": ["ready", "online_store_reachable"],
                      "properties": {"ready": {"type": "boolean"}, "online_store_reachable": {"type": "boolean"},
                                     "model_version": {"type": "integer", "nullable": True},
                                     "online_store": {"type": "string"}, "model_error": {"type": "string"},
                                     "model_registry": {"type": "string"},
                                     "workers": {"type": "string", "description": "with several workers: "
                                                 "how many are ready, e.g. \"2 of 2 ready\""}}},
            "Error": {"type": "object", "required": ["error", "status", "message"],
                      "properties": {"error": {"type": "string"}, "status": {"type": "integer"},
                                     "message": {"type": "string"}}},
        }},
    }
