"""Benchmarks side by side, in one run on one machine (``nox -s bench``).

    python -m benchmarks [--smoke] [--only SECTION] [--out DIR]

One module per benchmark, each preparing its own inputs in its own folder:

- :mod:`benchmarks.serving`: /predict (granian, Redis online store) against the
  granian floor (the same server with a minimal WSGI app doing one HMGET and a
  dot product, :mod:`benchmarks.floor_app`) with wrk and a Python client, one and
  8 clients; a batch POST against Feast's SDK ``get_online_features``; and the
  stock chain (``feast serve`` then ``mlflow models serve``, two HTTP hops).
- :mod:`benchmarks.loading`: ``feast materialize`` against this project's
  loader (Feast's layout), rows/s and peak memory, same file, same Redis.
- :mod:`benchmarks.features`: rows/s and peak memory of the features stage
  against a bare pyarrow CSV-to-Parquet pass (:mod:`benchmarks.pyarrow_pass`).
- :mod:`benchmarks.end_to_end`: wall time and peak memory of ``python -m
  pipeline run`` by rows, with the Redis online store.

:mod:`benchmarks.report` writes results.json, results.md (with the targets
table) and the plots. Traffic goes to 127.0.0.1 only (Redis through its port
published on the loopback); every load loop is bounded in count and time.
Figures are medians of repetitions after warm-up; compare them as ratios.
"""
