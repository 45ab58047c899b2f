"""The driver's Ray Tune searcher, called as Ray Tune calls it, without starting Ray."""

from __future__ import annotations

import logging

import optuna
import pytest

from ttl_search.data import DataConfig
from ttl_search.runner import RAY_TOKEN_NOTICE_LOGGER, _quiet_logger, make_searcher
from ttl_search.study import StudyConfig, make_sampler
from ttl_search.training import TrialConfig

pytest.importorskip("ray.tune")


def _searcher(events: list[dict]):
    cfg = StudyConfig(name="progress", trial=TrialConfig(backbone="test_cnn", input_size=28,
                                                         data=DataConfig("breastmnist")), concurrency=2)
    sampler = make_sampler(cfg)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    return make_searcher(study, sampler, cfg, None, events.append), study


def test_progress_counts_every_launched_trial_as_running():
    events: list[dict] = []
    searcher, study = _searcher(events)
    assert searcher.suggest("a") is not None
    assert events[-1]["running"] == 1
    assert searcher.suggest("b") is not None
    assert events[-1]["running"] == 2 and events[-1]["plan"].phase == "stage1"
    searcher.on_trial_complete("a", {"final": True, "payload": '{"status": "complete", "val": {"auroc": 0.7}}'})
    assert events[-1]["running"] == 1 and events[-1]["complete"] == 1


def test_the_token_notice_logger_is_quiet_only_inside_the_block(caplog):
    logger = logging.getLogger(RAY_TOKEN_NOTICE_LOGGER)
    with caplog.at_level(logging.WARNING, logger=RAY_TOKEN_NOTICE_LOGGER):
        with _quiet_logger(RAY_TOKEN_NOTICE_LOGGER):
            logger.warning("Token authentication is enabled for this Ray cluster.")
        assert not caplog.records
        logger.warning("later warnings still show")
    assert [r.getMessage() for r in caplog.records] == ["later warnings still show"]
