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

from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.wrappers import Request, Response

from pipeline import schema
from pipeline.errors import BadRequest, UnprocessableEntity


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


def parse_entity_id(value: Any) -> int:
    """An entity key from JSON or a query string: a non-negative int64."""
    if isinstance(value, bool) or value is None:
        raise UnprocessableEntity(f"{schema.JOIN_KEY} must be an integer, got {json.dumps(value)}")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise UnprocessableEntity(f"{schema.JOIN_KEY} must be an integer, got {value!r}")
        value = int(value)
    if isinstance(value, str):
        text = value.strip()
        if not text.isdigit() or not text.isascii():
            raise UnprocessableEntity(f"{schema.JOIN_KEY} must be an integer, got {value[:40]!r}")
        value = int(text)
    if not isinstance(value, int):
        raise UnprocessableEntity(f"{schema.JOIN_KEY} must be an integer, got a {type(value).__name__}")
    if not 0 <= value <= schema.ENTITY_ID_MAX:
        raise UnprocessableEntity(f"{schema.JOIN_KEY} must be between 0 and {schema.ENTITY_ID_MAX}")
    return value


def parse_body(body: bytes, max_batch: int) -> tuple[list[int], bool]:
    """``(entity ids, is_batch)`` from a POST body; raises 400/422 errors."""
    try:
        payload = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"request body is not valid JSON ({str(exc)[:120]}); send "
                         f'{{"{schema.JOIN_KEY}": 1000}} or {{"instances": [{{"{schema.JOIN_KEY}": 1000}}]}}'
                         ) from None
    if not isinstance(payload, dict):
        raise UnprocessableEntity(f"request body must be a JSON object, got a {type(payload).__name__}")
    unexpected = sorted(set(payload) - {schema.JOIN_KEY, "instances"})
    if unexpected or len(payload) != 1:
        raise UnprocessableEntity(f'send exactly one of "{schema.JOIN_KEY}" or "instances"'
                                  + (f"; unexpected keys: {unexpected[:5]}" if unexpected else ""))
    if schema.JOIN_KEY in payload:
        return [parse_entity_id(payload[schema.JOIN_KEY])], False
    instances = payload["instances"]
    if not isinstance(instances, list) or not instances:
        raise UnprocessableEntity('"instances" must be a non-empty list of objects')
    if len(instances) > max_batch:
        raise UnprocessableEntity(f'"instances" holds {len(instances)} items; at most {max_batch} per request')
    ids = []
    for i, item in enumerate(instances):
        if not isinstance(item, dict) or set(item) != {schema.JOIN_KEY}:
            raise UnprocessableEntity(f'instances[{i}] must be {{"{schema.JOIN_KEY}": <integer>}}')
        ids.append(parse_entity_id(item[schema.JOIN_KEY]))
    return ids, True


def parse_query(args, sample_entity: int) -> list[int]:
    """The entity of ``GET /predict[?customer_id=N]``: the sample one when none is given."""
    unexpected = sorted(set(args) - {schema.JOIN_KEY})
    if unexpected:
        raise UnprocessableEntity(f"unknown query parameters {unexpected[:5]}; use ?{schema.JOIN_KEY}=N")
    raw = args.getlist(schema.JOIN_KEY)
    if len(raw) > 1:
        raise UnprocessableEntity(f"give {schema.JOIN_KEY} once, or POST a batch")
    return [parse_entity_id(raw[0])] if raw else [sample_entity]


def parse_request(request: Request, *, max_batch: int, max_body_bytes: int,
                  sample_entity: int) -> tuple[list[int], bool]:
    """``(entity ids, is_batch)`` of a ``/predict`` request, GET or POST."""
    if request.method != "POST":
        return parse_query(request.args, sample_entity), False
    request.max_content_length = max_body_bytes
    try:
        body = request.get_data(cache=False)
    except RequestEntityTooLarge:
        raise JSONHTTPException(413, f"request body over {max_body_bytes} bytes; "
                                     "send fewer instances per request") from None
    return parse_body(body, max_batch)


# ---------------------------------------------------------------- OpenAPI
ENTITY_ID = {"type": "integer", "minimum": 0, "maximum": schema.ENTITY_ID_MAX}
ERROR = {"$ref": "#/components/schemas/Error"}


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": ERROR}}}


def spec(max_batch: int, max_body_bytes: int) -> dict:
    features = {
        "type": "object",
        "required": list(schema.FEATURE_NAMES),
        "additionalProperties": False,
        "properties": {f.name: {"type": "number", "description": f.description} for f in schema.FEATURES},
    }
    answer = {
        "type": "object",
        "required": [schema.JOIN_KEY, "prediction", "features"],
        "properties": {schema.JOIN_KEY: ENTITY_ID, "prediction": {"type": "number"},
                       "features": {"$ref": "#/components/schemas/Features"}},
    }
    errors = {
        "404": _error("no features in the online store for the entity"),
        "422": _error("well-formed JSON of the wrong shape or type"),
        "503": _error("no model yet, or the online store is unreachable"),
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "mlops-shared-volume prediction service", "version": "1"},
        "paths": {
            "/predict": {
                "get": {
                    "operationId": "predictGet",
                    "summary": "Predict for one entity; without the parameter, for a sample entity.",
                    "parameters": [{"name": schema.JOIN_KEY, "in": "query", "required": False,
                                    "schema": ENTITY_ID}],
                    "responses": {"200": {"description": "the prediction", "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Single"}}}},
                        **errors},
                },
                "post": {
                    "operationId": "predictPost",
                    "summary": f'Predict for {{"{schema.JOIN_KEY}": N}} or a batch of instances.',
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {
                        "oneOf": [
                            {"type": "object", "required": [schema.JOIN_KEY], "additionalProperties": False,
                             "properties": {schema.JOIN_KEY: ENTITY_ID}},
                            {"type": "object", "required": ["instances"], "additionalProperties": False,
                             "properties": {"instances": {
                                 "type": "array", "minItems": 1, "maxItems": max_batch,
                                 "items": {"type": "object", "required": [schema.JOIN_KEY],
                                           "additionalProperties": False,
                                           "properties": {schema.JOIN_KEY: ENTITY_ID}}}}},
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
                                "summary": "Readiness: a model is loaded and the online store answers.",
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
                                     "online_store": {"type": "string"}, "model_error": {"type": "string"}}},
            "Error": {"type": "object", "required": ["error", "status", "message"],
                      "properties": {"error": {"type": "string"}, "status": {"type": "integer"},
                                     "message": {"type": "string"}}},
        }},
    }
