"""The chart with a Dask scheduler (``dask.scheduler``): the ConfigMap names it for
the stages, and a volume the workers could not share is refused at render time."""

from __future__ import annotations

import pytest

from pipeline.settings import known_variables
from tests.deploy.chart import by_kind, render

SCHEDULER = "tcp://dask-scheduler.dask:8786"


def config_data(objects: list[dict]) -> dict[str, str]:
    return next(o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-config"))["data"]


def test_the_stages_get_the_scheduler_from_the_configmap():
    data = config_data(render(values={"dask": {"scheduler": SCHEDULER},
                                      "sharedVolume": {"accessMode": "ReadWriteMany"}}))
    assert data["MLOPS_DASK_SCHEDULER"] == SCHEDULER
    assert "MLOPS_DASK_SCHEDULER" in known_variables()


def test_without_a_scheduler_the_stages_run_in_their_own_pods():
    assert config_data(render())["MLOPS_DASK_SCHEDULER"] == ""  # empty is unset for the settings


def test_a_volume_the_workers_cannot_share_is_refused():
    with pytest.raises(Exception, match="ReadWriteMany"):
        render(values={"dask": {"scheduler": SCHEDULER}})
