"""The driver's Ray Tune searcher and its outcome mapping, called as Ray Tune calls them, without
starting Ray."""

from __future__ import annotations

import json
import logging

import optuna
import pytest
from optuna.trial import TrialState

from ttl_search.data import DataConfig
from ttl_search.run.cluster import RAY_TOKEN_NOTICE_LOGGER, _quiet_logger
from ttl_search.run.searcher import WORKER_LOST, StudySearcher, trial_outcome
from ttl_search.search.study import StudyConfig, make_sampler
from ttl_search.train.trial import TrialConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _final(**payload) -> dict:
    return {"final": True, "epoch": payload.get("epochs", 1), "payload": json.dumps(payload)}


COMPLETE = dict(status="complete", val={"auroc": 0.8, "loss": 0.4}, test={"auroc": 0.7}, params=100,
                trainable_params=10, epochs=2, checkpoint="/tmp/c.pt", node_id="n1",
                history=[{"epoch": 1, "auroc": 0.6}, {"epoch": 2, "auroc": float("nan")}])


# ---------------------------------------------------------------------------------------------
# trial_outcome: every way a Tune trial can end


def test_a_completed_trial_stores_its_metric_attributes_history_and_checkpoint():
    out = trial_outcome(_final(**COMPLETE), False, "auroc")
    assert out.state == TrialState.COMPLETE and out.value == 0.8 and out.reason == ""
    assert out.attrs["val_auroc"] == 0.8 and out.attrs["test_auroc"] == 0.7 and out.attrs["trainable_params"] == 10
    assert out.history == ((1, 0.6),)  # non-finite epochs are not intermediate values
    assert out.record.checkpoint == "/tmp/c.pt" and out.attrs["checkpoint"] == "/tmp/c.pt"


@pytest.mark.parametrize("value", [None, float("nan")])
def test_an_undefined_validation_metric_fails_the_trial(value):
    out = trial_outcome(_final(**{**COMPLETE, "val": {"auroc": value}}), False, "auroc")
    assert out.state == TrialState.FAIL and out.value is None
    assert "validation auroc is undefined" in out.reason and out.attrs["test_auroc"] == 0.7


def test_a_trial_that_failed_itself_keeps_its_reason():
    out = trial_outcome(_final(status="failed", reason="diverged", epochs=3), False, "auroc")
    assert out.state == TrialState.FAIL and out.reason == "diverged" and out.attrs["epochs"] == 3
    out = trial_outcome(_final(status="failed"), False, "auroc")
    assert out.reason == "failed"


def test_a_trial_that_stopped_itself_is_pruned():
    out = trial_outcome(_final(status="pruned", reason="early stop", epochs=2), False, "auroc")
    assert out.state == TrialState.PRUNED and out.attrs["stopped_by"] == "early stop"


def test_a_scheduler_stop_is_pruned_with_its_epochs():
    out = trial_outcome({"epoch": 2, "val_metric": 0.5, "node_id": "n2"}, False, "auroc")
    assert out.state == TrialState.PRUNED and out.attrs == {"epochs": 2, "node_id": "n2", "stopped_by": "scheduler"}


@pytest.mark.parametrize("result", [None, {"epoch": 1}])
def test_a_lost_worker_fails_the_trial(result):
    out = trial_outcome(result, True if result else False, "auroc")
    assert out.state == TrialState.FAIL and out.reason == WORKER_LOST


OOM = dict(status="failed", retry=False, epochs=0, device="cuda:0", device_name="NVIDIA H100 80GB HBM3 (cuda:0)",
           reason="out of memory on NVIDIA H100 80GB HBM3 (cuda:0) at batch_size 512 (eval_batch_size 256): ...",
           memory={"peak_allocated_gib": 70.1, "total_gib": 79.2},
           device_assignment={"device": "cuda:0", "gpu_ids": ["1"], "visible": "1"})


def test_a_device_failure_fails_the_trial_with_its_reason_figures_and_no_retry():
    out = trial_outcome(_final(**OOM), False, "auroc")
    assert out.state == TrialState.FAIL and out.retry is False and out.reason == OOM["reason"]
    assert out.attrs["retry"] is False and out.attrs["device_memory"] == OOM["memory"]
    assert out.attrs["device_assignment"]["gpu_ids"] == ["1"] and out.attrs["device"] == "cuda:0"
    assert out.where == "cuda:0 (NVIDIA H100 80GB HBM3 (cuda:0); Ray GPU 1)"
    diverged = trial_outcome(_final(status="failed", reason="diverged", epochs=3), False, "auroc")
    assert diverged.retry is True and "retry" not in diverged.attrs


# ---------------------------------------------------------------------------------------------
# StudySearcher


def _searcher(events: list[dict]) -> tuple[StudySearcher, optuna.Study]:
    cfg = StudyConfig(name="progress", trial=TrialConfig(backbone="test_cnn", input_size=28,
                                                         data=DataConfig("breastmnist")), concurrency=2)
    sampler = make_sampler(cfg)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    return StudySearcher(study, sampler, cfg, None, events.append), study


def test_progress_counts_every_launched_trial_as_running():
    events: list[dict] = []
    searcher, study = _searcher(events)
    assert searcher.suggest("a") is not None
    assert events[-1]["running"] == 1
    assert searcher.suggest("b") is not None
    assert events[-1]["running"] == 2 and events[-1]["plan"].phase == "stage1"
    searcher.on_trial_complete("a", _final(**COMPLETE))
    assert events[-1]["running"] == 1 and events[-1]["complete"] == 1


def test_the_searcher_stores_each_outcome_and_waits_at_the_stage_barrier():
    searcher, study = _searcher([])
    configs = {tid: searcher.suggest(tid) for tid in ("a", "b", "c")}
    assert [c["trial"]["cut"] for c in configs.values()] == [7, 5, 3]  # the stage-end cuts, longest first
    assert searcher.suggest("d") is None  # stage barrier: ask again later
    searcher.on_trial_result("a", {"epoch": 1, "val_raw": 0.55})
    searcher.on_trial_complete("a", _final(**COMPLETE))
    searcher.on_trial_complete("b", {"epoch": 1}, error=True)
    searcher.on_trial_complete("c", {"epoch": 1, "node_id": "n3"})
    a, b, c = study.get_trials()
    assert (a.state, a.value, a.intermediate_values) == (TrialState.COMPLETE, 0.8, {1: 0.55})
    assert a.user_attrs["ray_trial_id"] == "a" and a.user_attrs["val_auroc"] == 0.8
    assert (b.state, b.user_attrs["fail_reason"]) == (TrialState.FAIL, WORKER_LOST)
    assert (c.state, c.user_attrs["stopped_by"]) == (TrialState.PRUNED, "scheduler")
    assert searcher.counts == {"complete": 1, "failed": 1, "pruned": 1}
    assert searcher.suggest("e")["trial"]["cut"] == 5  # the failed stage-end cut is retried


def test_a_trial_out_of_memory_is_stored_failed_and_not_retried_and_the_log_names_each_device(caplog):
    """A lost worker's trial is retried (above); one whose device ran out of memory is not: the
    plan counts it as every retry spent. The driver's log says which device each trial got."""
    searcher, study = _searcher([])
    assert [searcher.suggest(t)["trial"]["cut"] for t in "abc"] == [7, 5, 3]
    cpu = {"device_assignment": {"device": "cpu", "gpu_ids": [], "visible": ""}, "device": "cpu",
           "device_name": "CPU x86_64, 1 thread(s) of 2"}
    with caplog.at_level(logging.INFO, logger="ttl_search.run.searcher"):
        searcher.on_trial_result("a", _final(**OOM))
        searcher.on_trial_result("b", _final(**COMPLETE, **cpu))
        searcher.on_trial_result("c", _final(**{**COMPLETE, "val": {"auroc": 0.7, "loss": 0.5}}, **cpu))
    a = study.get_trials()[0]
    assert a.state == TrialState.FAIL and a.user_attrs["fail_reason"] == OOM["reason"]
    assert a.user_attrs["retry"] is False and a.user_attrs["device_assignment"]["gpu_ids"] == ["1"]
    assert study.get_trials()[1].user_attrs["device_assignment"] == cpu["device_assignment"]
    stage2 = searcher.suggest("d")
    assert stage2 is not None and stage2["trial"]["cut"] == 4  # stage 2 of cut 5's stage; cut 7 is not retried
    assert all(t.params["cut"] != 7 or t.number == 0 for t in study.get_trials())
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("trial 0 failed on cuda:0 (NVIDIA H100 80GB HBM3 (cuda:0); Ray GPU 1): out of memory")
               for m in logged), logged
    assert any(m.startswith("trial 1 complete on cpu (CPU x86_64, 1 thread(s) of 2; Ray assigned no GPU)")
               for m in logged), logged


def test_the_plan_reads_a_failure_that_cannot_be_retried_as_every_retry_spent():
    from ttl_search.run.searcher import memory_settings, planning_trials

    searcher, study = _searcher([])
    searcher.suggest("a"), searcher.suggest("b")
    searcher.on_trial_result("a", _final(**OOM))
    searcher.on_trial_complete("b", {"epoch": 1}, error=True)  # a lost worker: retried as usual
    oom, lost = study.get_trials()
    settings = memory_settings(searcher.cfg)
    assert oom.user_attrs["failed_with"] == settings and settings["resources.gpus"] == 0
    assert planning_trials([oom, lost], 2, settings) == [oom, oom, oom, lost]
    assert planning_trials([oom, lost], 0, settings) == [oom, lost]
    # resumed with a larger share of the GPU (or a smaller eval batch): tried again
    assert planning_trials([oom, lost], 2, {**settings, "resources.gpus": 1.0}) == [oom, lost]


def test_a_final_result_is_stored_at_once_and_waiting_asks_do_not_read_the_study():
    searcher, study = _searcher([])
    reads = []
    read = searcher._trials
    searcher._trials = lambda: reads.append(1) or read()
    for tid in ("a", "b", "c"):
        assert searcher.suggest(tid) is not None
    assert [searcher.suggest(tid) for tid in "defg"] == [None] * 4
    assert len(reads) == 4  # three launches, then one read for the barrier: its repeats come from memory
    # the final result is stored when it arrives, so the plan goes on while Tune still holds the
    # trial's worker (and can hand it to stage 2); Tune's later completion changes nothing
    searcher.on_trial_result("a", _final(**COMPLETE))
    assert study.get_trials()[0].state == TrialState.COMPLETE and searcher.counts["complete"] == 1
    searcher.on_trial_complete("a", _final(**COMPLETE))
    assert searcher.counts["complete"] == 1 and len(study.get_trials()) == 3
    assert searcher.suggest("h") is None  # b and c still run: the barrier holds
    for tid in ("b", "c"):
        searcher.on_trial_result(tid, _final(**{**COMPLETE, "val": {"auroc": 0.7, "loss": 0.5}}))
    stage2 = searcher.suggest("i")
    assert stage2 is not None and stage2["trial"]["cut"] == 6  # inside stage 3 (cut 7 scored the best, 0.8)


def test_the_token_notice_logger_is_quiet_only_inside_the_block(caplog):
    logger = logging.getLogger(RAY_TOKEN_NOTICE_LOGGER)
    with caplog.at_level(logging.WARNING, logger=RAY_TOKEN_NOTICE_LOGGER):
        with _quiet_logger(RAY_TOKEN_NOTICE_LOGGER):
            logger.warning("Token authentication is enabled for this Ray cluster.")
        assert not caplog.records
        logger.warning("later warnings still show")
    assert [r.getMessage() for r in caplog.records] == ["later warnings still show"]


# ---------------------------------------------------------------------------------------------
# Failures to store: a full artifact folder, a lost lease


@pytest.fixture
def full_folder(tmp_path):
    """A real 4 KiB file system (tmpfs): every larger write fails with ENOSPC."""
    import subprocess

    path = tmp_path / "full"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): the full-disk tests need a real full file system")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_a_checkpoint_the_worker_cannot_write_fails_the_trial_with_the_folder_and_reason(full_folder):
    import torch

    from ttl_search.run.cluster import save_checkpoint

    path = full_folder / "study" / "trial-0.pt"
    payload = save_checkpoint({"w": torch.zeros(64, 64)}, path)
    assert payload["status"] == "failed" and not path.exists()
    assert str(full_folder / "study") in payload["reason"] and "No space left on device" in payload["reason"]
    out = trial_outcome(_final(**{**COMPLETE, **payload}), False, "auroc")
    assert out.state == TrialState.FAIL and out.infrastructure == payload["reason"]


def test_a_checkpoint_the_driver_cannot_store_fails_the_trial_and_stops_the_study(full_folder, tmp_path):
    from ttl_search.run.searcher import Halt

    checkpoint = tmp_path / "trial-0.pt"
    checkpoint.write_bytes(b"\0" * 65536)  # written by the worker elsewhere; the store's copy will not fit
    searcher, study = _searcher([])
    searcher.artifacts = full_folder
    searcher.suggest("a"), searcher.suggest("b")
    searcher.on_trial_complete("a", _final(**{**COMPLETE, "checkpoint": str(checkpoint)}))
    a, b = study.get_trials()
    assert a.state == TrialState.FAIL and "No space left on device" in a.user_attrs["fail_reason"]
    assert str(full_folder) in a.user_attrs["fail_reason"]
    assert Halt(searcher).stop_all() and "the study stops" in str(searcher.fatal)
    assert searcher.suggest("c") is searcher.FINISHED
    searcher.stop_unfinished()  # what Tune stopped is stored as failed, never left RUNNING
    b = study.get_trials()[1]
    assert b.state == TrialState.FAIL and "stopped unfinished when the study stopped" in b.user_attrs["fail_reason"]


def test_a_driver_that_lost_its_lease_writes_nothing_more(tmp_path):
    from ttl_search.lease import DriverLease
    from ttl_search.storage import open_storage

    engine = open_storage(f"sqlite:///{tmp_path / 'l.db'}").engine
    mine, other = DriverLease(engine, "progress", 30, 120), DriverLease(engine, "progress", 30, 120)
    mine.acquire()
    searcher, study = _searcher([])
    searcher.lease = mine
    searcher.suggest("a")
    other.acquire(force=True)
    assert mine.renew() is False
    searcher.on_trial_complete("a", _final(**COMPLETE))
    searcher.stop_unfinished()
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]  # the new driver reconciles it
    assert searcher.suggest("b") is searcher.FINISHED and "taken over" in str(searcher.fatal)
    other.release()
