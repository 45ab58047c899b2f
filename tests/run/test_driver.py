"""The driver checks what every trial needs before anything is stored or trained."""

from __future__ import annotations

import pytest
import torch

from ttl_search.errors import DataError, StudyError, WeightsError
from ttl_search.run.driver import run_study
from ttl_search.search.study import load_study_config
from ttl_search.storage import open_storage, study_names

from studyutil import DEBUG_STUDY


def _cfg(tmp_path, *overrides: str):
    return load_study_config(DEBUG_STUDY, [f"storage=sqlite:///{tmp_path / 's.db'}", *overrides])


def test_a_truncated_data_file_fails_before_the_study_exists(tmp_path, breastmnist):
    root = tmp_path / "data"
    root.mkdir()
    (root / "breastmnist.npz").write_bytes(breastmnist.read_bytes()[:20000])  # a download cut short
    cfg = _cfg(tmp_path, f"trial.data.root={root}", "trial.data.verify_md5=false")
    with pytest.raises(DataError) as info:
        run_study(cfg)
    assert "breastmnist.npz" in str(info.value)
    assert study_names(open_storage(cfg.storage)) == []  # the name is not used up


def test_weights_that_do_not_fit_fail_before_the_study_exists(tmp_path, breastmnist):
    weights = tmp_path / "wrong.pt"
    torch.save({"not_a_layer.weight": torch.zeros(3)}, weights)
    cfg = _cfg(tmp_path, f"trial.data.root={breastmnist.parent}", f"trial.weights={weights}")
    with pytest.raises(WeightsError):
        run_study(cfg)
    assert study_names(open_storage(cfg.storage)) == []


def test_a_driver_taken_over_after_its_search_stores_no_answer(tmp_path):
    """Taken over (``resume --force``) after its search: the driver stops with the reason instead
    of finishing as if nothing happened, and stores no answer for the dashboard (the reliability
    benchmark's second-driver case saw a takeover during the latency pass)."""
    import optuna

    from ttl_search.lease import DriverLease
    from ttl_search.results.dashboard import ANSWER_ATTR
    from ttl_search.run.driver import _publish

    cfg = _cfg(tmp_path)
    rdb = open_storage(cfg.storage)
    study = optuna.create_study(study_name=cfg.name, storage=rdb)
    mine, other = (DriverLease(rdb.engine, cfg.name, 30, 120) for _ in range(2))
    mine.acquire()
    other.acquire(force=True)
    with pytest.raises(StudyError, match="was taken over by the driver on"):
        _publish(study, cfg, mine)
    assert ANSWER_ATTR not in optuna.load_study(study_name=cfg.name, storage=rdb).user_attrs
    other.release()


@pytest.mark.integration
def test_a_local_ray_stops_with_every_process_it_started(monkeypatch):
    # shutdown_ray kills the autoscaler monitor itself first (Ray would wait a second for it); no
    # process of the local Ray may outlive the study, and a second start works
    import psutil
    import ray
    from ray._private import worker

    from ttl_search.run.cluster import RAY_ALREADY, RAY_LOCAL, init_ray, shutdown_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for _ in range(2):
        assert init_ray(None, num_cpus=1) == RAY_LOCAL
        assert init_ray(None) == RAY_ALREADY  # the caller's Ray: not shut down by shutdown_ray(RAY_ALREADY)
        shutdown_ray(RAY_ALREADY)
        assert ray.is_initialized()
        started = [info.process.pid for infos in worker._global_node.all_processes.values() for info in infos]
        assert "monitor" in worker._global_node.all_processes
        shutdown_ray(RAY_LOCAL)
        assert not ray.is_initialized()
        assert [pid for pid in started if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"] == []
