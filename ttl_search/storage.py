"""The study database: any SQLAlchemy URL through Optuna's RDBStorage.

SQLite is the default (a file in the working directory) with WAL journaling, ``synchronous=NORMAL``
and a 30 s busy timeout, so optuna-dashboard can read while the driver writes. PostgreSQL
(``postgresql+psycopg://...``) is for clusters and shared databases. Only the driver writes.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage, _CachedStorage
from optuna.trial import TrialState
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError

from .errors import ConfigError, StudyError, choices
from .search.record import BASELINES_PART, PART_TAG, PREDICTIONS_ATTR, TrialRecord, part_ref

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///ttl-search.db"
STORAGE_ENV = "TTL_SEARCH_STORAGE"
SQLITE_BUSY_TIMEOUT_S = 30
SCHEMA_RACE_RETRIES = 3


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection, _record) -> None:  # pragma: no cover - exercised via SQLite tests
    if isinstance(dbapi_connection, sqlite3.Connection):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.close()


def storage_url(url: str | None = None) -> str:
    """The storage URL to use: explicit, else ``$TTL_SEARCH_STORAGE``, else SQLite in the cwd."""
    return url or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages, logs and stored attributes."""
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy reads: hide anything between ':' and '@'
        return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", url)
    return parsed.render_as_string(hide_password=True) if parsed.password is not None else url


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (None for other databases or in-memory SQLite)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):]
    return Path(path) if path and path != ":memory:" else None


def open_storage(url: str | None = None) -> RDBStorage:
    """Open (and create if needed) the study database at ``url``."""
    url = storage_url(url)
    kwargs: dict = {}
    if url.startswith(("postgresql", "mysql")):
        kwargs["pool_pre_ping"] = True  # a connection the server dropped (restart, outage) is replaced, not used
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
        path = sqlite_path(url)
        if path is not None and not path.parent.exists():
            raise ConfigError(f"storage {mask_url(url)}: folder {path.parent} does not exist")
    for attempt in range(SCHEMA_RACE_RETRIES + 1):
        try:
            return RDBStorage(url, engine_kwargs=kwargs, skip_compatibility_check=False)
        except ModuleNotFoundError as exc:
            raise ConfigError(f"storage {mask_url(url)} needs a database driver that is not installed ({exc.name}); "
                              "for PostgreSQL: pip install 'ttl-search[postgres]'") from exc
        except Exception as exc:  # noqa: BLE001 - connection problems are the user's to fix
            if _schema_race(exc) and attempt < SCHEMA_RACE_RETRIES:
                # Another process (the dashboard, a second driver) created the schema at the same moment.
                time.sleep(0.5 * (attempt + 1))
                continue
            detail = str(exc).replace(url, mask_url(url))
            raise ConfigError(f"cannot open storage {mask_url(url)}: {type(exc).__name__}: {detail}") from None
    raise AssertionError("unreachable")


class StorageUnavailableError(StudyError):
    """The study database stayed unreachable for longer than the driver's patience."""


MAX_BACKOFF_S = 15.0
"""Longest wait between two attempts to reach a lost database."""


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the database could not be
    reached or the connection broke, rather than that a statement was wrong. Optuna turns such
    errors into ``StorageInternalError`` ("invalid data in the commit"), so the chain is searched."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (OperationalError, InterfaceError)) or (
                isinstance(exc, DBAPIError) and exc.connection_invalidated):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class _Retrying:
    """Every call goes to the wrapped storage; a lost connection is retried with exponential
    backoff (0.5 s doubling up to 15 s) until ``patience_s`` has passed since the first failure,
    then :class:`StorageUnavailableError`. ``on_wait`` hears a line while it waits and ``None``
    when the database is back."""

    def __init__(self, inner: BaseStorage, url: str, patience_s: float, study_name: str = "<name>",
                 on_wait: Callable[[str | None], None] | None = None) -> None:
        self._inner = inner
        self.url = url
        self.study_name = study_name
        self.patience_s = patience_s
        self.on_wait = on_wait

    def _call(self, name: str, args: tuple, kwargs: dict) -> Any:
        first = None
        attempt = 0
        while True:
            try:
                result = getattr(self._inner, name)(*args, **kwargs)
            except UpdateFinishedTrialError:
                if attempt and name == "set_trial_state_values":
                    return True  # the attempt that lost its connection had committed
                raise
            except Exception as exc:  # noqa: BLE001 - only connection losses are retried
                if not connection_lost(exc):
                    raise
                now = time.monotonic()
                first = now if first is None else first
                left = self.patience_s - (now - first)
                cause = _short_cause(exc)
                if left <= 0:
                    raise StorageUnavailableError(
                        f"the study database {mask_url(self.url)} has been unreachable for {now - first:.0f} s "
                        f"({cause}); the driver stops. Trainings that were running are lost and will be retrained: "
                        f"continue the study with `ttl-search resume {self.study_name}` once the database is back "
                        "(driver.storage_patience_s sets how long to wait)") from None
                log.warning("study database %s unreachable for %.0f s (%s); retrying for %.0f s more",
                            mask_url(self.url), now - first, cause, left)
                if self.on_wait is not None:
                    self.on_wait(f"database unreachable for {now - first:.0f} s, retrying for {left:.0f} s more")
                time.sleep(min(MAX_BACKOFF_S, 0.5 * 2 ** attempt, left))
                attempt += 1
                continue
            if first is not None:
                log.warning("study database reachable again after %.0f s", time.monotonic() - first)
                if self.on_wait is not None:
                    self.on_wait(None)
            return result

    def __getattr__(self, name: str) -> Any:  # non-storage attributes of the wrapped storage
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._inner, name)


def _short_cause(exc: BaseException) -> str:
    """The innermost message of ``exc``'s chain, on one line."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip().strip("()").splitlines()
    return f"{type(exc).__name__}: {text[0]}"[:200] if text else type(exc).__name__


def _delegate(name: str):
    def method(self, *args, **kwargs):
        return self._call(name, args, kwargs)

    method.__name__ = name
    return method


RetryingStorage = type(BaseStorage)(
    "RetryingStorage", (_Retrying, BaseStorage),
    {"__doc__": _Retrying.__doc__, "__module__": __name__,
     **{n: _delegate(n) for n in dir(BaseStorage) if not n.startswith("_") and callable(getattr(BaseStorage, n))}},
)
"""A :class:`~optuna.storages.BaseStorage` that rides out database outages (see :class:`_Retrying`)."""


def driver_storage(url: str, patience_s: float, study_name: str) -> "RetryingStorage":
    """The driver's storage for ``study_name``: Optuna's cached RDB storage (what
    ``optuna.create_study`` would build from the URL) behind :data:`RetryingStorage`."""
    return RetryingStorage(_CachedStorage(open_storage(url)), url, patience_s, study_name)


def study_engine(study: optuna.Study) -> Engine:
    """The SQLAlchemy engine behind a study opened on an RDB storage (cached or retrying)."""
    storage = study._storage
    while not isinstance(storage, RDBStorage):
        storage = getattr(storage, "_inner", None) or getattr(storage, "_backend")
    return storage.engine


def _schema_race(exc: Exception) -> bool:
    """Whether creating the schema failed because another process created it at the same time
    (a duplicate row, or "table ... already exists" from SQLite and PostgreSQL)."""
    return isinstance(exc, IntegrityError) or (isinstance(exc, DBAPIError) and "already exists" in str(exc))


def study_names(storage: RDBStorage) -> list[str]:
    return [s.study_name for s in storage.get_all_studies()]


def load_study(name: str, storage: RDBStorage, sampler=None) -> optuna.Study:
    """An existing study; an unknown name lists the studies in the database."""
    if name not in study_names(storage):
        names = study_names(storage)
        raise StudyError(f"no study named {name!r} in {mask_url(storage.url)}; studies there: {choices(names) or 'none'}")
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler)


BASELINES_ATTR = "baselines_study"
"""Study attribute naming the study's baselines study (``NAME:baselines``; absent for a study that
keeps its baselines with its search, as studies from before the split do)."""
BASELINES_OF_ATTR = "baselines_of"
"""Attribute of a baselines study: the study whose baselines it holds."""


def baselines_name(name: str) -> str:
    """The name of study ``name``'s baselines study."""
    return f"{name}:{BASELINES_PART}"


def baselines_study(study: optuna.Study, sampler=None) -> optuna.Study | None:
    """Study ``study``'s baselines study on the same storage (None when it keeps its baselines
    itself, or has none)."""
    name = study.user_attrs.get(BASELINES_ATTR)
    if not name:
        return None
    if name not in study_names(study._storage):  # e.g. the study alone was copied to another database
        log.warning("study %s keeps its baselines in study %s, which is not in this database: its baselines are "
                    "left out", study.study_name, name)
        return None
    return optuna.load_study(study_name=name, storage=study._storage,
                             sampler=sampler if sampler is not None else optuna.samplers.RandomSampler())


def study_trials(study: optuna.Study, baselines: optuna.Study | None | bool = True) -> list:
    """Every trial of ``study`` and of its baselines study (``baselines``: that study when the
    caller opened it already, None or False for none, True to open it here): the search's
    trials, then the baselines study's, tagged (in memory, see
    :data:`~ttl_search.search.record.PART_TAG`) so that records know where each lives."""
    trials = list(study.get_trials(deepcopy=False))
    if baselines is True:
        baselines = baselines_study(study)
    if baselines:
        for trial in baselines.get_trials(deepcopy=False):
            tagged = copy.copy(trial)
            tagged._system_attrs = {**trial.system_attrs, PART_TAG: BASELINES_PART}
            trials.append(tagged)
    return trials


def trial_ref(trial) -> int | str:
    """How commands name a trial of a merged view (:func:`study_trials`): its number, or
    ``baselines:N``."""
    return part_ref(trial.system_attrs.get(PART_TAG), trial.number)


def reconcile_running(storage: RDBStorage, study: optuna.Study, reason: str) -> list[int]:
    """Mark trials of ``study`` (in ``storage``) left RUNNING by a driver that died as FAIL with
    ``reason``, through the storage's public interface.

    Attributes go first: a finished trial no longer accepts them.
    """
    fixed = []
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        for key, value in TrialRecord(fail_reason=reason).measured_attrs().items():
            storage.set_trial_user_attr(trial_id, key, value)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        fixed.append(trial.number)
    if fixed:
        log.warning("marked trials %s of study %s as failed: %s", fixed, study.study_name, reason)
    return fixed


def artifact_store(artifacts: Path):
    """Optuna's file-system artifact store under ``artifacts/store`` (what optuna-dashboard lists)."""
    from optuna.artifacts import FileSystemArtifactStore

    base = Path(artifacts) / "store"
    base.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(base)


def attach_artifact(artifacts: Path, study_or_trial, path: Path, mimetype: str | None = None,
                    storage=None) -> str:
    """Register a file with the study's artifact store; returns the artifact id (``storage``: the
    study's, for a stored ``FrozenTrial``)."""
    from optuna.artifacts import upload_artifact

    return upload_artifact(artifact_store=artifact_store(artifacts), file_path=str(path), study_or_trial=study_or_trial,
                           mimetype=mimetype, storage=storage)


def set_trial_system_attr(trial, key: str, value: object) -> None:
    """Set a system attribute of a live trial through its storage's public interface (Optuna 5
    removed ``Trial.set_system_attr``); ttl-search keeps bulky data there (predictions), out of
    optuna-dashboard's attribute table."""
    storage = trial.storage
    study_id = storage.get_study_id_from_name(trial.study.study_name)
    storage.set_trial_system_attr(storage.get_trial_id_from_study_id_trial_number(study_id, trial.number), key, value)


def copied_system_attrs(trial) -> dict[str, object]:
    """The system attributes a copy of ``trial`` carries (a twin's result stored again): its
    artifact links (the files are not copied) and its predictions."""
    out = artifact_links(trial)
    if PREDICTIONS_ATTR in trial.system_attrs:
        out[PREDICTIONS_ATTR] = trial.system_attrs[PREDICTIONS_ATTR]
    return out


def artifact_links(trial) -> dict[str, object]:
    """The artifact entries of ``trial`` (checkpoint, plots), to list the same files under another
    trial without copying them (optuna-dashboard reads them from the trial's system attributes)."""
    from optuna.artifacts._upload import ARTIFACTS_ATTR_PREFIX

    return {k: v for k, v in trial.system_attrs.items() if k.startswith(ARTIFACTS_ATTR_PREFIX)}
