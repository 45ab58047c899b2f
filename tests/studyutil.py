"""Helpers for tests that run real studies: a `ttl-search` driver process, database polling."""

from __future__ import annotations

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


def run_cli(args: list[str], log: Path, timeout: float = 600) -> int:
    proc = start_driver(args, log)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_group(proc)


def trials(name: str, url: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
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
    return [(t.params.get("strategy"), t.params["cut"], t.params.get("repeat", 0)) for t in ts
            if t.state == TrialState.COMPLETE]
