"""Deployment budgets: which cuts a study may train and answer with (``selection.budget``).

A budget bounds the deployed model's parameters, MACs per image, weight size and forward time.
Parameters, MACs and size are known from the cut table before anything trains; the forward time
comes from a latency table measured before training, on the machine where the model will run
(``ttl-search cutoffs BACKBONE --measure-latency --format json`` run there and named in
``latency_table``), or by the driver's latency pass at study start on a worker with a trial's
resources. A cut over budget is never trained by any search method and never chosen; an answer
that averages several models (an ensemble) must fit the budget with all its members together.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..errors import ConfigError, choices
from .samplers import CutCandidate

BYTES_PER_PARAM = 4
"""A deployed model's weights are float32: ``model_mb`` is parameters x 4 bytes / 10^6."""
LATENCY_BATCHES = (1, 64)
"""Batches the latency tables time (``latency_batch``)."""
BUDGET_KEYS = ("params", "macs", "latency_ms", "model_mb")
"""The costs a budget may bound."""
LATENCY_TABLE_ATTR = "cut_latency"
"""Study attribute: the latency of every cut measured (or read) before training."""


@dataclass
class BudgetConfig:
    """Deployment limits of the answer (``selection.budget``); every unset limit is no limit."""

    params: float | None = None
    """Most parameters of the deployed model (all members of an ensemble together); ``1e6`` is
    read as the integer it names."""
    macs: float | None = None
    """Most multiply-accumulates per image (all members of an ensemble together)."""
    latency_ms: float | None = None
    """Most milliseconds of one forward pass of ``latency_batch`` images (median; the members of an
    ensemble run one after another, so their times add up), on the machine of ``latency_table``, or
    else on a trial's worker (measured at study start)."""
    latency_batch: int = 1
    """Images per forward pass that ``latency_ms`` bounds: 1 or 64."""
    model_mb: float | None = None
    """Most megabytes (10^6 bytes) of float32 weights (parameters x 4 bytes)."""
    latency_table: str | None = None
    """A JSON latency table measured on the target machine (``ttl-search cutoffs BACKBONE
    --input-size N --measure-latency --format json > FILE``): ``latency_ms`` is read from it
    instead of measured at study start."""

    def __post_init__(self) -> None:
        validate_budget(self)

    @property
    def active(self) -> bool:
        """Whether any limit is set."""
        return any(getattr(self, key) is not None for key in BUDGET_KEYS)

    def describe(self) -> str:
        """``params <= 1.0M, latency_ms <= 2 (batch 1)``; ``none`` without limits."""
        parts = [f"{key} <= {_fmt(key, getattr(self, key))}" for key in BUDGET_KEYS if getattr(self, key) is not None]
        if self.latency_ms is not None:
            parts[-1 if self.model_mb is None else -2] += f" (batch {self.latency_batch})"
        return ", ".join(parts) or "none"


def validate_budget(cfg: BudgetConfig) -> None:
    """Raise :class:`ConfigError` naming the key for a limit that is not a positive number."""
    for key in BUDGET_KEYS:
        value = getattr(cfg, key)
        if value is None:
            continue
        integral = key in ("params", "macs")
        ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
              and value > 0 and (not integral or float(value).is_integer()))
        if not ok:
            kind = "a positive integer" if integral else "a positive number"
            raise ConfigError(f"selection.budget.{key} must be {kind} (or null: no limit), got {value!r}; "
                              f"budget keys: {choices(BUDGET_KEYS)}")
        if integral:
            setattr(cfg, key, int(value))
    if cfg.latency_batch not in LATENCY_BATCHES:
        raise ConfigError(f"selection.budget.latency_batch must be one of {choices(LATENCY_BATCHES)}, "
                          f"got {cfg.latency_batch!r}")
    if cfg.latency_table is not None and not isinstance(cfg.latency_table, str):
        raise ConfigError(f"selection.budget.latency_table must be a path to a JSON file, got {cfg.latency_table!r}")


def parse_budget(items: Iterable[str], base: BudgetConfig | None = None) -> BudgetConfig:
    """``["latency_ms=2", "params=1e6"]`` (``best --budget``) -> a budget over ``base``, validated."""
    values: dict[str, Any] = {}
    valid = [f.name for f in fields(BudgetConfig)]
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in valid:
            raise ConfigError(f"--budget {item!r}: expected KEY=VALUE with KEY one of {choices(valid)}")
        text = text.strip()
        if key == "latency_table":
            values[key] = text
            continue
        try:
            number = float(text)
        except ValueError:
            raise ConfigError(f"--budget {item!r}: {text!r} is not a number") from None
        values[key] = int(number) if key in ("params", "macs", "latency_batch") and number.is_integer() else number
    return replace(base or BudgetConfig(), **values)


def _fmt(key: str, value: float) -> str:
    if key in ("params", "macs"):
        for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if value >= scale:
                return f"{value / scale:.3g}{unit}"
        return str(int(value))
    return f"{value:g}"


# ------------------------------------------------------------------------------- latency tables


def latency_of(table: Mapping[str, Any] | None, batch: int) -> dict[int, float]:
    """Cut -> median milliseconds at ``batch`` of a cut latency table (see :func:`read_latency_table`)."""
    if not table:
        return {}
    column = f"batch{batch}_ms"
    return {int(r["cut"]): float(r[column]) for r in table.get("rows", []) if r.get(column) is not None}


def read_latency_table(path: str | Path, backbone: str, input_size: int, in_channels: int) -> dict[str, Any]:
    """A latency table written by ``ttl-search cutoffs BACKBONE --measure-latency --format json``,
    checked against the study's backbone, input size and channels; returned as a study stores it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"selection.budget.latency_table: {path} not found (write it on the target machine with "
                          f"`ttl-search cutoffs {backbone} --input-size {input_size} --measure-latency --format json "
                          f"> {path.name}`)")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"selection.budget.latency_table: {path} is not a JSON latency table: {exc}") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows) \
            or "latency_batch1_ms" not in rows[0]:
        raise ConfigError(f"selection.budget.latency_table: {path} holds no latency rows (expected the output of "
                          "`ttl-search cutoffs BACKBONE --measure-latency --format json`)")
    first = rows[0]
    found = (first.get("backbone"), first.get("input_size"), first.get("in_channels"))
    if found != (backbone, input_size, in_channels):
        raise ConfigError(f"selection.budget.latency_table: {path} was measured for {found[0]} at {found[1]} px with "
                          f"{found[2]} channel(s); the study trains {backbone} at {input_size} px with {in_channels}")
    out = [{"cut": int(r["index"]), "batch1_ms": r.get("latency_batch1_ms"), "batch64_ms": r.get("latency_batch64_ms"),
            "batch1_iqr": r.get("latency_batch1_iqr"), "batch64_iqr": r.get("latency_batch64_iqr")}
           for r in rows if r.get("latency_batch1_ms") is not None]
    return {"source": str(path), "device_name": first.get("latency_device"), "repeats": first.get("latency_repeats"),
            "threads": first.get("latency_threads"), "rows": out}


# -------------------------------------------------------------------------------- feasibility


def model_mb(params: float) -> float:
    """Megabytes of float32 weights."""
    return params * BYTES_PER_PARAM / 1e6


def cost_excess(budget: BudgetConfig, params: float | None, macs: float | None,
                latency_ms: float | None) -> str:
    """Why a model of these costs is over ``budget`` (``""`` when it fits); an unknown cost that the
    budget bounds is over it (it cannot be shown to fit)."""
    over = []
    checks = (("params", params, budget.params), ("macs", macs, budget.macs),
              ("model_mb", None if params is None else model_mb(params), budget.model_mb),
              ("latency_ms", latency_ms, budget.latency_ms))
    for key, value, limit in checks:
        if limit is None:
            continue
        if value is None or (isinstance(value, float) and math.isnan(value)):
            what = ("not measured (no latency table covers it; `ttl-search report STUDY --measure-latency` "
                    "times the trained models)" if key == "latency_ms" else "unknown")
            over.append(f"{key} {what}")
        elif value > limit * (1 + 1e-12):
            over.append(f"{key} {_fmt(key, value)} > {_fmt(key, limit)}")
    return "over budget: " + ", ".join(over) if over else ""


def apply_budget(candidates: Sequence[CutCandidate], budget: BudgetConfig,
                 latency: Mapping[str, Any] | None = None) -> list[CutCandidate]:
    """Every candidate with its budget fields set: ``latency_ms`` from ``latency`` (a cut latency
    table) and ``over_budget`` (why it is over budget, ``""`` when it fits)."""
    times = latency_of(latency, budget.latency_batch)
    out = []
    for c in candidates:
        ms = times.get(c.index, c.latency_ms if latency is None else None)
        out.append(replace(c, latency_ms=ms, over_budget=cost_excess(budget, c.params, c.macs, ms)))
    return out


def feasible(candidates: Sequence[CutCandidate]) -> list[CutCandidate]:
    """The candidates within the study's budget: the cuts a search may train."""
    return [c for c in candidates if not c.over_budget]


def check_feasible(candidates: Sequence[CutCandidate], budget: BudgetConfig, backbone: str) -> list[CutCandidate]:
    """The feasible candidates, or a :class:`ConfigError` naming the smallest cut's cost when no
    cut meets the budget."""
    ok = feasible(candidates)
    if ok or not candidates:
        return ok
    small = min(candidates, key=lambda c: (c.params, c.index))
    latency = f", {small.latency_ms:g} ms at batch {budget.latency_batch}" if small.latency_ms is not None else ""
    raise ConfigError(
        f"no cut of {backbone} meets selection.budget ({budget.describe()}): the smallest, cut {small.index} "
        f"({small.name}), has {small.params:,} parameters ({model_mb(small.params):.2f} MB), "
        f"{'-' if small.macs is None else f'{small.macs:,}'} MACs{latency}; raise the budget or lower "
        "trial.input_size")
