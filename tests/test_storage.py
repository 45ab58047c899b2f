"""The study database: opening a fresh one from several processes at once."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

OPEN = """
import sys, time
from ttl_search.storage import open_storage
start = float(sys.argv[2])
while time.time() < start:
    pass
open_storage("sqlite:///" + sys.argv[1])
"""


@pytest.mark.slow
def test_processes_that_create_the_schema_at_once_all_open_it(tmp_path):
    """A dashboard and a driver started at the same moment on a new database both create its
    schema; the one that loses the race ("table studies already exists") retries instead of
    failing."""
    failures = []
    for i in range(6):
        start = time.time() + 3.0  # after every process has imported ttl_search
        procs = [subprocess.Popen([sys.executable, "-c", OPEN, str(tmp_path / f"db{i}.sqlite"), str(start)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            if proc.returncode:
                failures.append(err.strip().splitlines()[-1])
    assert not failures, failures


def test_the_storage_password_never_shows():
    """A database that cannot be reached: the error names the URL with its password masked."""
    from ttl_search.errors import ConfigError
    from ttl_search.storage import mask_url, open_storage

    url = "postgresql+psycopg://ttl:s3cret-pw@127.0.0.1:1/studies"
    with pytest.raises(ConfigError) as info:
        open_storage(url)
    message = str(info.value)
    assert "s3cret-pw" not in message and "ttl:***@127.0.0.1:1/studies" in message
    assert mask_url("sqlite:///a.db") == "sqlite:///a.db"
    assert mask_url("postgresql://u@h/db") == "postgresql://u@h/db"


# ---------------------------------------------------------------------------------------------
# The driver's storage rides out database outages


def test_only_lost_connections_count_as_an_outage():
    import optuna
    from sqlalchemy.exc import DataError, OperationalError

    from ttl_search.storage import connection_lost

    lost = OperationalError("SELECT 1", {}, Exception("connection refused"))
    try:  # how Optuna reports it: "invalid data in the commit", raised from the real error
        raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from lost
    except optuna.exceptions.StorageInternalError as exc:
        wrapped = exc
    assert connection_lost(lost) and connection_lost(wrapped)
    assert not connection_lost(DataError("INSERT", {}, Exception("value too long")))
    assert not connection_lost(ValueError("bad value"))


@pytest.fixture
def postgres_server():
    from pgserver import server_or_skip

    server = server_or_skip()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.slow
@pytest.mark.integration
def test_a_short_outage_is_retried_and_a_long_one_ends_with_a_clear_error(postgres_server, tmp_path):
    import threading

    import optuna

    from ttl_search.storage import StorageUnavailableError, driver_storage

    waits: list = []
    storage = driver_storage(postgres_server.url, patience_s=60, study_name="outage")
    storage.on_wait = waits.append
    study = optuna.create_study(study_name="outage", storage=storage)
    study.enqueue_trial({"x": 1.0})

    # a 3 s outage: the call waits for the server, then goes through
    postgres_server.stop()
    threading.Timer(3.0, postgres_server.start).start()
    started = time.monotonic()
    trial = study.ask()
    assert time.monotonic() - started >= 2.5
    study.tell(trial, 1.0)
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"]
    assert waits[0].startswith("database unreachable") and waits[-1] is None  # said so, then back

    # longer than the patience: a clear error that names the study, not Optuna's "invalid data"
    storage.patience_s = 2
    postgres_server.stop()
    with pytest.raises(StorageUnavailableError) as info:
        study.get_trials(deepcopy=False)
    message = str(info.value)
    assert "has been unreachable for" in message and "ttl-search resume outage" in message
    assert "invalid data" not in message
