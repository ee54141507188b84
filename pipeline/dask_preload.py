"""Preload for the workers of a Dask cluster you run yourself.

``dask worker SCHEDULER --preload pipeline.dask_preload`` (or the same in a
``DaskCluster``'s worker args) has each worker process leave Feast's classes
uninstrumented by typeguard, as the command line and the local cluster's
workers do (:func:`pipeline.skip_feast_typechecks`): train's bucket tasks
import Feast, and instrumenting it costs each worker process about 2.7 s.
Without the preload the cluster works the same, only slower to warm up.
"""

from pipeline import skip_feast_typechecks

skip_feast_typechecks()
