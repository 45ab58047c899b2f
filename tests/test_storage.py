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
