"""mlops-shared-volume: one pipeline, one set of modules, three runtimes.

Stages (``python -m pipeline <stage>``): ingest, features, feast, train,
promote, serve; ``run`` runs all but serve, in order.
"""

__version__ = "0.1.0"
