"""Helpers for tests that run real studies: a `ttl-search` driver process, database polling."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parents[1]
DEBUG_STUDY = REPO / "studies" / "debug.yaml"


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


def start_driver(args: list[str], log: Path) -> subprocess.Popen:
    """A `ttl-search` process in its own process group (so Ray's helpers die with it)."""
    handle = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "ttl_search", *args], stdout=handle, stderr=subprocess.STDOUT,
                            env=cli_env(), start_new_session=True, cwd=str(log.parent))


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and everything in its process group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    time.sleep(1.0)


def cli(*args: object) -> subprocess.CompletedProcess:
    """``ttl-search ARGS`` in this process (no interpreter and torch start-up, seconds per call):
    its exit status, stdout and stderr. For commands that start no Ray (reading, refusals)."""
    import contextlib
    import io

    from ttl_search.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return subprocess.CompletedProcess([str(a) for a in args], rc, out.getvalue(), err.getvalue())


def run_cli(args: list[str], log: Path, timeout: float = 600) -> int:
    proc = start_driver(args, log)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_group(proc)


@functools.lru_cache(maxsize=None)
def _storage(url: str) -> optuna.storages.RDBStorage:
    """One storage (one connection pool) per URL for the whole test session: polling with a new
    storage each time leaves a pool per call open until garbage collection, which ran PostgreSQL
    out of connections ("too many clients") on a loaded machine."""
    from ttl_search.storage import open_storage

    return open_storage(url)  # pool_pre_ping on PostgreSQL: polls survive a server restart


def trials(name: str, url: str) -> list[optuna.trial.FrozenTrial]:
    """The trials of study ``name`` and of its baselines study (none while it does not exist yet)."""
    from ttl_search.storage import study_trials

    try:
        return study_trials(optuna.load_study(study_name=name, storage=_storage(url)))
    except KeyError:
        return []


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300, interval: float = 0.2, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the driver exited ({proc.returncode}) before {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def complete_keys(ts) -> list[tuple]:
    """(strategy, cut, repeat) of the completed trials (parameters, or the launch attributes where a
    study never varies one)."""
    from ttl_search.search.samplers import trial_key

    return [(k.strategy, k.cut, k.repeat) for t in ts if t.state == TrialState.COMPLETE and (k := trial_key(t))]


def synthetic_study(cfg, strength: dict[int, float], seeds: int = 1, n_pos: int = 70, n_neg: int = 30,
                    baselines: dict[str, float] | None = None, predictions: bool = True,
                    extra_seeds: dict[int, tuple[int, float]] | None = None, bias: dict[int, float] | None = None,
                    probe: dict[int, float] | None = None):
    """An in-memory study of ``cfg`` whose completed trials were never trained: cut ``c`` of seed
    ``r`` "predicts" logits ``(label - 0.5) * strength[c] + noise(seed r)`` on fixed validation and test
    labels, with every attribute a real trial stores (metrics, size, train time, predictions).

    ``extra_seeds``: cut -> (n, strength): n more seeds of that cut (repeats ``seeds..seeds+n-1``,
    as an ensemble phase trains them) with their own strength. ``bias``: cut -> a constant added to
    the fine-tuned cut's logits (the same ranking, another decision threshold: a large one answers
    one class). ``probe``: cut -> strength of a frozen probe's model at that cut, stored as a real
    probe phase stores its table and predictions (no probe trial).

    Returns (study, candidates). Train time of cut c is ``10 * c`` seconds.
    """
    import numpy as np

    from ttl_search.config import to_dict
    from ttl_search.results import CANDIDATES_ATTR, CONFIG_ATTR
    from ttl_search.search.record import PREDICTIONS_ATTR, TrialRecord
    from ttl_search.search.samplers import job_distributions
    from ttl_search.search.study import cut_candidates, trial_strategies
    from ttl_search.train.metrics import compute_metrics
    from ttl_search.train.predictions import encode_predictions

    from dataclasses import asdict

    candidates = cut_candidates(cfg)
    by_index = {c.index: c for c in candidates}
    strategies = sorted({"ttl", *trial_strategies(cfg), *(baselines or {})})
    extra_seeds = extra_seeds or {}
    dists = job_distributions(candidates, strategies, seeds + max((n for n, _ in extra_seeds.values()), default=0))
    study = optuna.create_study(direction=cfg.resolved_direction, study_name=cfg.name)
    study.set_user_attr(CONFIG_ATTR, to_dict(cfg))
    study.set_user_attr(CANDIDATES_ATTR, [asdict(c) for c in candidates])
    labels = np.r_[np.ones(n_pos, dtype=np.int64), np.zeros(n_neg, dtype=np.int64)]
    jobs = [("ttl", c, s, range(seeds)) for c, s in strength.items()] + [
        (b, candidates[-1].index, s, range(seeds)) for b, s in (baselines or {}).items()] + [
        ("ttl", c, s, range(seeds, seeds + n)) for c, (n, s) in extra_seeds.items()]
    for strategy, cut, s, repeats in jobs:
        for repeat in repeats:
            rng = np.random.default_rng([cut, repeat, len(strategy)])
            split_probs = {}
            shift = (bias or {}).get(cut, 0.0) if strategy == "ttl" else 0.0
            for split in ("val", "test"):
                score = 1 / (1 + np.exp(-((labels - 0.5) * s + rng.normal(0, 1, labels.size) + shift)))
                split_probs[split] = np.c_[1 - score, score]
            val = compute_metrics(labels, split_probs["val"])
            test = compute_metrics(labels, split_probs["test"])
            c = by_index[cut]
            record = TrialRecord(strategy=strategy, cut=cut, repeat=repeat, cut_name=c.name, stage=c.stage,
                                 phase="exhaustive", seed=repeat, val=val, test=test, params=c.params,
                                 trainable_params=c.params, train_time_s=10.0 * cut)
            system = ({PREDICTIONS_ATTR: {k: encode_predictions(labels, p) for k, p in split_probs.items()}}
                      if predictions else {})
            study.add_trial(optuna.trial.create_trial(
                params={k: v for k, v in {"strategy": strategy, "cut": cut, "repeat": repeat}.items() if k in dists},
                distributions=dists,
                value=val[cfg.metric], user_attrs=record.to_attrs(), system_attrs=system))
    if probe:
        from ttl_search.results import PROBE_ATTR, PROBE_PREDICTIONS_ATTR

        stored, rows = {}, []
        for cut, s in probe.items():
            rng = np.random.default_rng([cut, 99])
            split_probs = {}
            for split in ("val", "test"):
                score = 1 / (1 + np.exp(-((labels - 0.5) * s + rng.normal(0, 1, labels.size))))
                split_probs[split] = np.c_[1 - score, score]
            stored[str(cut)] = {k: encode_predictions(labels, p) for k, p in split_probs.items()}
            c = by_index[cut]
            rows.append({"cut": cut, "name": c.name, "stage": c.stage, "params": c.params, "channels": 8,
                         "probe_val": compute_metrics(labels, split_probs["val"])[cfg.metric], "seconds": 0.5})
        study._storage.set_study_system_attr(study._study_id, PROBE_PREDICTIONS_ATTR, stored)
        study.set_user_attr(PROBE_ATTR, {"rows": rows, "seconds": 1.0, "metric": cfg.metric})
    return study, candidates
