"""mlops-shared-volume: one pipeline, one set of modules, three runtimes.

Stages (``python -m pipeline <stage>``): ingest, features, feast, train,
promote, serve; ``run`` runs all but serve, in order.
"""

__version__ = "0.1.0"


def skip_feast_typechecks() -> None:
    """Leave Feast's classes as written instead of letting typeguard instrument them.

    Feast decorates its definition classes (``FeatureView``, ``Entity``,
    ``Field``, the data sources) with typeguard's ``@typechecked``, which reads
    each module's source again and recompiles it with checks woven in: 2.7 of
    the 3.8 s that ``import feast`` took here, paid by every stage process and
    serving worker. The checks only guard the arguments of those constructors,
    which this project's definitions (:mod:`pipeline.feast`) pass the same way
    on every run and the tests exercise. ``@typechecked`` on anything outside
    Feast is left as it was; ``python -O`` is what skips it everywhere, but that
    also drops asserts.

    Called by the entry points (:func:`pipeline.cli.main`, the serving worker's
    :func:`pipeline.launcher.worker_app`, the local Dask cluster's workers in
    :func:`pipeline.dask_engine.open_client`, and a user's own Dask workers
    through :mod:`pipeline.dask_preload`) before Feast is imported:
    importing the package changes nothing.
    """
    try:
        import typeguard
    except ImportError:  # no typeguard, so no Feast that uses it: nothing to skip
        return
    original = typeguard.typechecked
    if getattr(original, "skips_feast", False):
        return

    def typechecked(target=None, **options):
        if target is None:  # @typechecked(...) with options: a decorator that takes the target next
            return lambda later: typechecked(later, **options)
        if getattr(target, "__module__", "").partition(".")[0] == "feast":
            return target
        return original(target, **options)

    typechecked.skips_feast = True
    typechecked.__doc__ = original.__doc__
    typeguard.typechecked = typechecked

