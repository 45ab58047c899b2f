"""One driver per study: the lease in the study database (SQLite, and PostgreSQL when
$TTL_SEARCH_TEST_POSTGRES is set), taken, refused, forced, taken over when stale or dead."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest
from sqlalchemy import update

from ttl_search.errors import StudyError
from ttl_search.lease import LEASES, DriverLease, read_lease
from ttl_search.storage import open_storage


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        return open_storage(f"sqlite:///{tmp_path / 'lease.db'}").engine
    url = os.environ.get("TTL_SEARCH_TEST_POSTGRES")
    if not url:
        pytest.skip("TTL_SEARCH_TEST_POSTGRES is not set (.ci/run starts PostgreSQL and sets it)")
    return open_storage(url).engine


@pytest.fixture
def name() -> str:
    return f"lease-{uuid.uuid4().hex[:8]}"


def _lease(engine, name: str, heartbeat_s: float = 30.0, stale_after_s: float = 120.0) -> DriverLease:
    return DriverLease(engine, name, heartbeat_s, stale_after_s)


def _set(engine, name: str, **values) -> None:
    with engine.begin() as conn:
        conn.execute(update(LEASES).where(LEASES.c.study_name == name).values(**values))


def test_a_live_lease_is_refused_with_who_holds_it_and_how_to_force(engine, name):
    assert read_lease(engine, name) is None
    first = _lease(engine, name)
    with first:
        assert first.acquire() is None
        held = read_lease(engine, name)
        assert (held.holder, held.pid) == (first.holder, os.getpid())
        second = _lease(engine, name)
        with pytest.raises(StudyError) as info:
            second.acquire()
        message = str(info.value)
        assert f"pid {os.getpid()}" in message and first.host in message
        assert f"ttl-search resume {name} --force" in message
        assert read_lease(engine, name).holder == first.holder  # the refusal changed nothing
    assert read_lease(engine, name) is None  # released


def test_force_takes_a_live_lease_and_the_old_holder_learns_it_lost(engine, name):
    first, second = _lease(engine, name), _lease(engine, name)
    first.acquire()
    try:
        previous = second.acquire(force=True)
        assert previous.holder == first.holder
        assert first.renew() is False and first.lost.is_set()
        assert "taken over by" in first.lost_reason and f"pid {second.pid}" in first.lost_reason
        first.release()  # gives back nothing: the lease is the second driver's now
        assert read_lease(engine, name).holder == second.holder
        assert second.renew() is True
    finally:
        second.release()
        first.release()


def test_a_stale_lease_is_taken_over_without_force(engine, name):
    first = _lease(engine, name, stale_after_s=60)
    first.acquire()
    _set(engine, name, heartbeat=time.time() - 61, host="another-host")  # its heartbeat stopped a minute ago
    second = _lease(engine, name, stale_after_s=60)
    try:
        previous = second.acquire()
        assert previous is not None and previous.host == "another-host" and not previous.alive(60)
        assert read_lease(engine, name).holder == second.holder
    finally:
        second.release()
        first.release()


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(engine, name):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    first = _lease(engine, name)
    first.acquire()
    _set(engine, name, pid=gone.pid)  # fresh heartbeat, but its process is gone (a SIGKILLed driver)
    lease = read_lease(engine, name)
    assert lease.age() < 5 and lease.process_gone() and not lease.alive(120)
    second = _lease(engine, name)
    try:
        assert second.acquire().pid == gone.pid
    finally:
        second.release()
        first.release()


def test_the_heartbeat_thread_renews_the_lease(engine, name):
    with _lease(engine, name, heartbeat_s=0.1, stale_after_s=1) as lease:
        lease.acquire()
        first = read_lease(engine, name).heartbeat
        deadline = time.time() + 10
        while read_lease(engine, name).heartbeat == first and time.time() < deadline:
            time.sleep(0.05)
        assert read_lease(engine, name).heartbeat > first
        assert read_lease(engine, name).alive(1)


def test_a_pid_from_another_pid_namespace_is_not_taken_for_dead(engine, name):
    """A driver in a container that shares this host name has pids of its own: only its heartbeat
    can say it is dead."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    first = _lease(engine, name)
    first.acquire()
    _set(engine, name, pid=gone.pid, pid_namespace="another-namespace")
    assert not read_lease(engine, name).process_gone()
    with pytest.raises(StudyError):
        _lease(engine, name).acquire()
    first.release()
