"""One driver per study, enforced in the study database.

A driver holds a *lease* on its study: a row of the table ``ttl_search_driver_leases`` (beside
Optuna's tables, in the same database) with its host, pid, a random holder id and a heartbeat
it renews from a background thread. Taking a lease is atomic in the database itself: a new lease
is an INSERT on the study's primary key (only one driver can win), and taking over a stale one
is an UPDATE guarded by the old holder and heartbeat (compare-and-swap).

A lease is *alive* while its heartbeat is younger than ``stale_after_s`` and, when it was taken
on this host, its process still exists (a driver killed with SIGKILL on this host is known dead
at once; the PID namespace is part of the check, for containers that share a host name).
``status`` reads leases without Ray; only drivers write them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from importlib import import_module
from typing import Callable

from sqlalchemy import Column, Float, Integer, MetaData, String, Table, delete, insert, inspect, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from .errors import StudyError

log = logging.getLogger(__name__)

_METADATA = MetaData()
LEASES = Table(
    "ttl_search_driver_leases", _METADATA,
    Column("study_name", String(512), primary_key=True),
    Column("holder", String(64), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("pid_namespace", String(64), nullable=True),
    Column("started", Float, nullable=False),
    Column("heartbeat", Float, nullable=False),
)
"""Who drives which study (one row per study with a driver, alive or not)."""


@dataclass(frozen=True)
class Lease:
    """A stored lease: which driver holds a study, and its last sign of life."""

    study_name: str
    """The study."""
    holder: str
    """Random id of the holding driver (one per driver run)."""
    host: str
    """Host name of the driver."""
    pid: int
    """Process id of the driver on its host."""
    pid_namespace: str | None
    """The driver's PID namespace: a pid means the same process only within one (containers that
    share a host name have their own)."""
    started: float
    """When the driver took the lease (seconds since the epoch)."""
    heartbeat: float
    """When the driver last renewed it (seconds since the epoch)."""

    def age(self, now: float | None = None) -> float:
        """Seconds since the last heartbeat."""
        return max(0.0, (time.time() if now is None else now) - self.heartbeat)

    def process_gone(self) -> bool:
        """Whether the lease was taken on this host by a process that no longer exists."""
        if self.host != socket.gethostname() or self.pid_namespace != pid_namespace():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def alive(self, stale_after_s: float, now: float | None = None) -> bool:
        """Whether the holder still drives the study (fresh heartbeat, process not known dead)."""
        return self.age(now) < stale_after_s and not self.process_gone()

    def describe(self, now: float | None = None) -> str:
        """``the driver on HOST (pid N), last heartbeat 12 s ago``."""
        return f"the driver on {self.host} (pid {self.pid}), last heartbeat {_ago(self.age(now))}"


def pid_namespace() -> str | None:
    """This process's PID namespace (Linux), or None where there is no such thing."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return None


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _ensure_table(engine: Engine) -> None:
    for attempt in range(3):
        try:
            _METADATA.create_all(engine, checkfirst=True)
            return
        except (OperationalError, ProgrammingError, IntegrityError):  # another process created it just now
            if attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))


def _insert_if_absent(engine: Engine, row: dict) -> bool:
    """INSERT the lease row unless the study has one; whether it was inserted. PostgreSQL and SQLite
    say so with ``ON CONFLICT DO NOTHING``, so taking over a lease leaves no error in the server's
    log; other databases answer with the primary key's IntegrityError."""
    dialect = engine.dialect.name
    if dialect in ("postgresql", "sqlite"):
        stmt = import_module(f"sqlalchemy.dialects.{dialect}").insert(LEASES).values(**row)
        with engine.begin() as conn:
            stmt = stmt.on_conflict_do_nothing(index_elements=["study_name"]).returning(LEASES.c.study_name)
            return conn.execute(stmt).first() is not None  # (rowcount is -1 here with psycopg)
    try:
        with engine.begin() as conn:
            conn.execute(insert(LEASES).values(**row))
        return True
    except IntegrityError:
        return False


def read_lease(engine: Engine, study_name: str) -> Lease | None:
    """The stored lease of ``study_name``, or None (no driver has held it since the table existed)."""
    if not inspect(engine).has_table(LEASES.name):
        return None
    with engine.connect() as conn:
        row = conn.execute(select(LEASES).where(LEASES.c.study_name == study_name)).mappings().first()
    return Lease(**row) if row else None


class DriverLease:
    """This driver's lease on one study: taken by :meth:`acquire`, renewed every ``heartbeat_s``
    by a daemon thread, given back by :meth:`release`. Use as a context manager.

    ``lost`` is set (with ``lost_reason``) when another driver took the study over with
    ``--force``; the driver must then stop writing to the study.
    """

    def __init__(self, engine: Engine, study_name: str, heartbeat_s: float, stale_after_s: float) -> None:
        self.engine = engine
        self.study_name = study_name
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.holder = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.lost = threading.Event()
        self.lost_reason = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking it ----------------------------------------------------------------------------------
    def acquire(self, force: bool = False, refuse: Callable[[Lease], str] | None = None) -> Lease | None:
        """Take the lease; returns the lease taken over (None when there was none).

        A live lease held by another driver is refused with a :class:`StudyError` (its message from
        ``refuse``, default: how to wait, stop or force); ``force`` takes it anyway.
        """
        _ensure_table(self.engine)
        for _ in range(5):
            now = time.time()
            row = {"study_name": self.study_name, "holder": self.holder, "host": self.host, "pid": self.pid,
                   "pid_namespace": pid_namespace(), "started": now, "heartbeat": now}
            if _insert_if_absent(self.engine, row):
                self._start()
                return None
            # a lease row exists: alive, stale, or left by a driver that ended cleanly elsewhere
            held = read_lease(self.engine, self.study_name)
            if held is None:
                continue  # released in between: try the INSERT again
            if held.alive(self.stale_after_s, now) and not force:
                raise StudyError(refuse(held) if refuse else self.refusal(held))
            with self.engine.begin() as conn:
                taken = conn.execute(
                    update(LEASES)
                    .where(LEASES.c.study_name == self.study_name, LEASES.c.holder == held.holder,
                           LEASES.c.heartbeat == held.heartbeat)
                    .values(**{k: v for k, v in row.items() if k != "study_name"})
                ).rowcount
            if taken == 1:
                why = "forced" if held.alive(self.stale_after_s, now) else (
                    "its process is gone" if held.process_gone() else "it stopped heartbeating")
                log.warning("study %s: took over from %s (%s)", self.study_name, held.describe(now), why)
                self._start()
                return held
        raise StudyError(f"study {self.study_name!r}: another driver keeps taking its lease; try again")

    def check_free(self, force: bool = False) -> None:
        """Refuse at once when a live driver holds the study (before a resume spends seconds loading
        data and models); :meth:`acquire` decides for good."""
        held = None if force else read_lease(self.engine, self.study_name)
        if held is not None and held.holder != self.holder and held.alive(self.stale_after_s):
            raise StudyError(self.refusal(held))

    def refusal(self, held: Lease) -> str:
        """Why a live lease cannot be taken, and what to do."""
        return (f"study {self.study_name!r} is being run by {held.describe()}; only one driver may run a study. "
                f"Wait for it to finish (`ttl-search status {self.study_name}`), stop it, or, if you know it is dead, "
                f"`ttl-search resume {self.study_name} --force` (a lease is taken over by itself once its heartbeat is "
                f"older than {self.stale_after_s:g} s)")

    # -- keeping it ---------------------------------------------------------------------------------
    def _start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"ttl-lease-{self.study_name}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - a database outage: the next beat tries again
                log.debug("study %s: heartbeat not stored (%s)", self.study_name, exc)
            if self.lost.is_set():
                return

    def renew(self) -> bool:
        """Store a heartbeat; False (and ``lost`` set) when another driver holds the lease now."""
        with self.engine.begin() as conn:
            renewed = conn.execute(
                update(LEASES).where(LEASES.c.study_name == self.study_name, LEASES.c.holder == self.holder)
                .values(heartbeat=time.time())
            ).rowcount
        if renewed == 1:
            return True
        held = read_lease(self.engine, self.study_name)
        self.lost_reason = (f"study {self.study_name!r} was taken over by "
                            f"{held.describe() if held else 'another driver'}; this driver stops without storing "
                            "anything more")
        self.lost.set()
        return False

    def ensure_held(self) -> None:
        """Renew now; raise :class:`StudyError` when another driver took the study over (the caller
        then writes nothing more). A database outage is left to the storage's own retries."""
        if not self.lost.is_set():
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001
                log.debug("study %s: lease not renewed (%s)", self.study_name, exc)
        if self.lost.is_set():
            raise StudyError(self.lost_reason)

    # -- giving it back -----------------------------------------------------------------------------
    def release(self) -> None:
        """Stop the heartbeat and delete the lease (when still ours); never raises."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        try:
            with self.engine.begin() as conn:
                conn.execute(delete(LEASES).where(LEASES.c.study_name == self.study_name,
                                                  LEASES.c.holder == self.holder))
        except Exception as exc:  # noqa: BLE001 - the database is gone: the lease goes stale by itself
            log.warning("study %s: could not give back the driver lease (%s); it goes stale in %g s",
                        self.study_name, type(exc).__name__, self.stale_after_s)

    def __enter__(self) -> "DriverLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
