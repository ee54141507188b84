"""The OpenAPI 3.0 description of the service, served at ``/openapi.json``.

Kept beside the handlers it describes; schemathesis runs it against the live
server in the tests, so a drift between the two fails CI.
"""

from __future__ import annotations

from pipeline import schema

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
