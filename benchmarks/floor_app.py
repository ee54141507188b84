"""The floor of any Python /predict: a minimal WSGI app that does one HMGET of the
entity's Feast hash and a dot product, nothing else (no validation, no metrics).

Served by granian's WSGI interface in the serving benchmark (the same HTTP server
as /predict); configured by the environment:
``FLOOR_REDIS_URL`` (on 127.0.0.1), ``FLOOR_ENTITY`` (an entity id) and
``FLOOR_COEFFICIENTS`` (a JSON list in ``schema.feature_names`` order).
The key and field names come from :class:`pipeline.redis_layout.FeastRedisLayout`,
the same layout the loader writes.
"""

from __future__ import annotations

import json
import os

import numpy as np
import redis

from pipeline.dataset import CUSTOMERS
from pipeline.redis_layout import FeastRedisLayout

_layout = FeastRedisLayout(CUSTOMERS)
_client = redis.Redis.from_url(os.environ["FLOOR_REDIS_URL"])
_key = _layout.feast_key(int(os.environ["FLOOR_ENTITY"]))
_coefficients = np.array(json.loads(os.environ["FLOOR_COEFFICIENTS"]))


def app(environ, start_response):
    values = _client.hmget(_key, _layout.fields)
    x = np.array(_layout.decode(values))  # the layout's own decoder
    body = json.dumps({"prediction": float(x @ _coefficients)}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
