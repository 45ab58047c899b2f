"""One typed record of a stored trial, the only place that knows its attribute keys; the per-cut
summary of such records; and how counts are written for people.

A trial's identity is its Optuna parameters (``strategy``, ``cut``, ``repeat``, and ``lr`` /
``weight_decay`` when they are searched); everything else is a user attribute, which
optuna-dashboard shows as it is stored: flat keys, ``val_<metric>`` and ``test_<metric>`` for the
metrics.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, Iterable, Sequence

from optuna.trial import FrozenTrial, TrialState

from ..train.metrics import METRICS
from ..train.predictions import decode_predictions

SPLITS = ("val", "test")
PREDICTIONS_ATTR = "ttl_predictions"
"""Trial system attribute with the selected checkpoint's ``val`` and ``test`` predictions (labels
and class probabilities, encoded): metrics and their intervals are recomputed from them. A system
attribute, so that optuna-dashboard's attribute table stays readable."""
SEARCH_STRATEGY = "ttl"
"""The transfer strategy the search trains (TruncatedTL); the others are baselines."""
BASELINES_PART = "baselines"
"""How a trial of a study's baselines study (``NAME:baselines``) is labelled: ``baselines:3``."""
PART_TAG = "ttl_part"
"""System attribute that a merged view of a study and its baselines study (see
:func:`ttl_search.storage.study_trials`) sets, in memory only, on the baselines study's trials."""


@dataclass
class TrialRecord:
    """A trial of a study as ttl-search writes and reads it."""

    number: int = -1
    """Optuna trial number (-1 before it is stored)."""
    part: str = ""
    """``baselines`` for a trial of the study's baselines study, "" for one of the study itself."""
    state: str = "RUNNING"
    """Optuna state name: RUNNING, COMPLETE, PRUNED, FAIL, WAITING."""
    value: float | None = None
    """The objective: the validation metric the search optimises (COMPLETE only)."""
    strategy: str = SEARCH_STRATEGY
    """Transfer strategy: ``ttl`` or a baseline."""
    cut: int | None = None
    """Cut index (None for a trial killed before it had parameters)."""
    repeat: int = 0
    """Seed index (0-based)."""
    fold: int | None = None
    """Validating fold (0-based) of a cross-validated study (``selection.folds`` > 1); None otherwise."""
    lr: float | None = None
    """Learning rate, when the search tunes it (else the study's)."""
    weight_decay: float | None = None
    """Weight decay, when the search tunes it (else the study's)."""
    cut_name: str | None = None
    """Name of the last kept unit."""
    stage: int | None = None
    """Backbone stage of the cut."""
    phase: str | None = None
    """Search phase: stage1, stage2, exhaustive, tpe or baseline."""
    seed: int | None = None
    """Training seed."""
    val: dict[str, float] = field(default_factory=dict)
    """Validation metrics of the selected checkpoint."""
    test: dict[str, float] = field(default_factory=dict)
    """Test metrics of the selected checkpoint (never used to decide anything)."""
    params: int | None = None
    """Parameters of the trained model."""
    trainable_params: int | None = None
    """Parameters the strategy trains (a linear probe: the head only)."""
    macs: int | None = None
    """Multiply-accumulates of one forward pass."""
    latency_batch1_ms: float | None = None
    """Median forward time at batch 1 (ms)."""
    latency_batch64_ms: float | None = None
    """Median forward time at batch 64 (ms)."""
    latency_device: str | None = None
    """Device the latency was measured on."""
    full_params: int | None = None
    """Parameters of the untruncated model with the same head."""
    full_macs: int | None = None
    """MACs of the untruncated model."""
    full_latency_batch1_ms: float | None = None
    """Batch-1 latency of the untruncated model (ms)."""
    epochs: int | None = None
    """Epochs trained."""
    best_epoch: int | None = None
    """Epoch of the selected checkpoint."""
    train_time_s: float | None = None
    """Seconds spent training (0 for a result copied from a twin)."""
    duration_s: float | None = None
    """Seconds the worker spent on the whole trial."""
    driver_duration_s: float | None = None
    """Seconds between the driver handing the trial to Ray and storing its outcome."""
    node_id: str | None = None
    """Ray node that trained it."""
    device: str | None = None
    """Torch device it trained on."""
    input_size: int | None = None
    """Input side in pixels."""
    dataset_md5: str | None = None
    """md5 of the data file it trained on."""
    checkpoint: str | None = None
    """Path of the selected checkpoint (a weights-only state dict)."""
    checkpoint_artifact_id: str | None = None
    """Optuna artifact id of the checkpoint."""
    fail_reason: str | None = None
    """Why it failed (FAIL)."""
    stopped_by: str | None = None
    """What stopped it early (PRUNED): ``scheduler`` or the trial's own reason."""
    reused_from: int | str | None = None
    """Label of the trial whose result this one copies (the same model with the same seed): its
    number, or ``baselines:N`` for a trial of the baselines study."""
    ray_trial_id: str | None = None
    """Ray Tune's id of the trial."""
    started: datetime | None = None
    """When Optuna started it."""
    completed: datetime | None = None
    """When it finished."""

    IDENTITY = ("strategy", "cut", "repeat", "fold", "lr", "weight_decay")
    """Fields stored as Optuna parameters, not attributes."""
    NOT_ATTRS = ("number", "part", "state", "value", "val", "test", "started", "completed") + IDENTITY
    SHOWN_IDENTITY = ("strategy", "cut", "repeat", "fold")
    """Identity fields also written as attributes (optuna-dashboard lists attributes)."""

    # -- writing -------------------------------------------------------------------------------
    def to_attrs(self) -> dict[str, Any]:
        """The user attributes of this record: set fields only, metrics as ``val_*``/``test_*``,
        identity fields too (optuna-dashboard shows attributes, not only parameters)."""
        attrs: dict[str, Any] = {}
        for f in fields(self):
            if f.name not in self.NOT_ATTRS or f.name in self.SHOWN_IDENTITY:
                value = getattr(self, f.name)
                if value is not None:
                    attrs[f.name] = value
        for split in SPLITS:
            for name, value in getattr(self, split).items():
                if _finite(value):
                    attrs[f"{split}_{name}"] = value
        return attrs

    # -- reading -------------------------------------------------------------------------------
    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], **known: Any) -> "TrialRecord":
        """A record from flat user attributes (unknown keys are ignored) and ``known`` fields."""
        names = {f.name for f in fields(cls)} - set(cls.NOT_ATTRS)
        values: dict[str, Any] = {k: v for k, v in attrs.items() if k in names}
        for split in SPLITS:
            prefix = f"{split}_"
            found = {k[len(prefix):]: v for k, v in attrs.items() if k.startswith(prefix) and _finite(v)}
            values[split] = dict(sorted(found.items(), key=lambda kv: _metric_rank(kv[0])))
        for key in cls.SHOWN_IDENTITY:
            if key in attrs:
                values[key] = attrs[key]
        values.update({k: v for k, v in known.items() if v is not None})
        return cls(**values)

    @classmethod
    def from_trial(cls, trial: FrozenTrial) -> "TrialRecord":
        """The record of a stored trial; its parameters are its identity."""
        p = trial.params
        return cls.from_attrs(
            trial.user_attrs, number=trial.number, part=trial.system_attrs.get(PART_TAG), state=trial.state.name,
            value=trial.value if trial.state == TrialState.COMPLETE else None,
            strategy=p.get("strategy"), cut=p.get("cut"), repeat=p.get("repeat"), fold=p.get("fold"), lr=p.get("lr"),
            weight_decay=p.get("weight_decay"), started=trial.datetime_start, completed=trial.datetime_complete,
        )

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "TrialRecord":
        """The measured part of a record from a worker's result (``TrialResult.to_dict()`` plus
        ``node_id``, ``worker_duration_s`` and ``checkpoint``)."""
        latency = payload.get("latency_ms") or {}
        full = payload.get("full") or {}
        return cls(
            val={k: v for k, v in (payload.get("val") or {}).items() if _finite(v)},
            test={k: v for k, v in (payload.get("test") or {}).items() if _finite(v)},
            params=payload.get("params"), trainable_params=payload.get("trainable_params"), macs=payload.get("macs"),
            latency_batch1_ms=latency.get("batch1"), latency_batch64_ms=latency.get("batch64"),
            latency_device=latency.get("device"), full_params=full.get("params"), full_macs=full.get("macs"),
            full_latency_batch1_ms=(full.get("latency_ms") or {}).get("batch1"), epochs=payload.get("epochs"),
            best_epoch=payload.get("best_epoch"), train_time_s=payload.get("train_time_s"),
            node_id=payload.get("node_id"), duration_s=payload.get("worker_duration_s"), device=payload.get("device"),
            input_size=payload.get("input_size"), dataset_md5=(payload.get("data") or {}).get("md5"),
            checkpoint=payload.get("checkpoint") or None,
        )

    def measured_attrs(self) -> dict[str, Any]:
        """The attributes a finished training adds (metrics, size, cost, where and how long);
        not the identity, which the driver stored when it launched the trial."""
        launch = ("strategy", "cut", "repeat", "fold", "cut_name", "stage", "phase", "seed", "ray_trial_id")
        return {k: v for k, v in self.to_attrs().items() if k not in launch}

    # -- derived -------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self.state == TrialState.COMPLETE.name

    @property
    def ref(self) -> int | str:
        """How commands name the trial (``--trial``, ``best``'s lists): its number, or
        ``baselines:N`` for a trial of the baselines study."""
        return part_ref(self.part, self.number)

    @property
    def wall_s(self) -> float | None:
        """Seconds from Optuna's start to its completion."""
        if self.started and self.completed:
            return round((self.completed - self.started).total_seconds(), 2)
        return None

    @property
    def note(self) -> str:
        """Why it failed, stopped early, or was not trained ("" otherwise)."""
        if self.fail_reason or self.stopped_by:
            return self.fail_reason or self.stopped_by or ""
        if self.reused_from is not None:
            return f"same model as trial {self.reused_from}: stored, not trained again"
        return ""


def part_ref(part: str | None, number: int) -> int | str:
    """A trial's name in a study and its baselines study read as one: ``number`` for the study's
    own trials, ``baselines:number`` for the baselines study's (``part``)."""
    return f"{part}:{number}" if part else number


def trial_predictions(trial: FrozenTrial, split: str = "val") -> tuple[Any, Any] | None:
    """(labels (N,), probs (N, K)) a stored trial predicted on ``split``; None when it stored
    none (a trial from before predictions were stored, or one that did not complete)."""
    stored = trial.system_attrs.get(PREDICTIONS_ATTR)
    if not isinstance(stored, dict) or split not in stored:
        return None
    try:
        return decode_predictions(stored[split])
    except ValueError:
        return None


def _metric_rank(name: str) -> tuple[int, str]:
    """Metrics in the order :data:`~ttl_search.train.metrics.METRICS` lists them, others after."""
    order = list(METRICS)
    return (order.index(name) if name in order else len(order), name)


def records(trials: Iterable[FrozenTrial]) -> list[TrialRecord]:
    return [TrialRecord.from_trial(t) for t in trials]


# ---------------------------------------------------------------------------------------------
# Per-cut summaries


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mean_sd(values: Iterable[Any]) -> tuple[float | None, float | None]:
    """Mean and sample sd of the finite numbers in ``values`` (sd 0 for one; None, None for none)."""
    clean = [float(v) for v in values if _finite(v)]
    if not clean:
        return None, None
    return statistics.fmean(clean), (statistics.stdev(clean) if len(clean) > 1 else 0.0)


@dataclass
class CutSummary:
    """The completed trials of one (strategy, cut): metrics as mean and sd over seeds, size, cost."""

    strategy: str
    cut: int
    cut_name: str | None
    stage: int | None
    trials: list[int | str]
    """Trial numbers (``baselines:N`` in the baselines study)."""
    seeds: list[int | None]
    val: dict[str, float]
    """Mean validation metrics."""
    val_sd: dict[str, float]
    test: dict[str, float]
    test_sd: dict[str, float]
    params: int | None
    trainable_params: int | None
    macs: int | None
    latency_batch1_ms: float | None
    """Median batch-1 latency: from the study's quiet latency pass (see
    :mod:`ttl_search.train.latency`) when it has one, else the mean of what its trials measured."""
    latency_batch64_ms: float | None
    full_params: int | None
    full_macs: int | None
    latency_batch1_iqr: tuple[float, float] | None = None
    """Interquartile range of the batch-1 latency (the latency pass only)."""
    latency_device: str | None = None
    """Where the latency was measured."""

    @property
    def repeats(self) -> int:
        return len(self.trials)


def summarize_cut(group: Sequence[TrialRecord], latency: dict[str, Any] | None = None) -> CutSummary:
    """Mean and sd over the records of one (strategy, cut) of every metric they carry; its latency
    from the study's latency table (``latency``) when it has this model."""
    first = group[0]
    row = latency_row(latency, first.strategy, first.cut)
    out: dict[str, dict[str, float]] = {"val": {}, "val_sd": {}, "test": {}, "test_sd": {}}
    for split in SPLITS:
        names = list(dict.fromkeys(name for r in group for name in getattr(r, split)))
        for name in names:
            mean, sd = mean_sd(getattr(r, split).get(name) for r in group)
            if mean is not None:
                out[split][name], out[f"{split}_sd"][name] = mean, sd
    return CutSummary(
        strategy=first.strategy, cut=first.cut, cut_name=first.cut_name, stage=first.stage,
        trials=[r.ref for r in group], seeds=[r.seed for r in group], **out,
        params=first.params, trainable_params=first.trainable_params, macs=first.macs,
        latency_batch1_ms=row["batch1_ms"] if row else mean_sd(r.latency_batch1_ms for r in group)[0],
        latency_batch64_ms=row["batch64_ms"] if row else mean_sd(r.latency_batch64_ms for r in group)[0],
        full_params=first.full_params, full_macs=first.full_macs,
        latency_batch1_iqr=tuple(row["batch1_iqr"]) if row and row.get("batch1_iqr") else None,
        latency_device=latency.get("device_name") if row else first.latency_device,
    )


def latency_row(table: dict[str, Any] | None, strategy: str, cut: int | None) -> dict[str, Any] | None:
    """The latency table's row of model (``strategy``, ``cut``), if it has one."""
    for row in (table or {}).get("rows", []):
        if row["strategy"] == strategy and row["cut"] == cut:
            return row
    return None


def completed_by_cut(recs: Iterable[TrialRecord], strategy: str | None = None) -> dict[tuple[str, int], list[TrialRecord]]:
    """Completed records grouped by (strategy, cut), sorted; ``strategy`` keeps only that one."""
    groups: dict[tuple[str, int], list[TrialRecord]] = {}
    for r in recs:
        if r.complete and r.cut is not None and (strategy is None or r.strategy == strategy):
            groups.setdefault((r.strategy, int(r.cut)), []).append(r)
    return dict(sorted(groups.items()))


# ---------------------------------------------------------------------------------------------
# Numbers for people


def fmt_count(n: Any, unit: str = "") -> str:
    """``3.38M``, ``700.99k``, ``250``; ``-`` for unknown (None or NaN)."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    n = float(n)
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def partly_trainable(total: Any, trainable: Any) -> bool:
    """Whether fewer than ``total`` parameters train (False where either count is unknown)."""
    return fmt_count(total) != "-" and fmt_count(trainable) != "-" and float(trainable) < float(total)


def fmt_params(total: Any, trainable: Any) -> str:
    """``3.38M (2.56k trainable)``; just the total when every parameter trains (or either is unknown)."""
    if not partly_trainable(total, trainable):
        return fmt_count(total)
    return f"{fmt_count(total)} ({fmt_count(trainable)} trainable)"


def _unknown(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt_value(value: Any, digits: int = 4) -> str:
    """A metric for people: ``digits`` decimals, ``-`` when missing or not finite."""
    if _unknown(value) or not math.isfinite(float(value)):
        return "-"
    return f"{float(value):.{digits}f}"


def fmt_interval(ci: Sequence[Any] | None) -> str:
    """``[0.8123, 0.9456]``; ``-`` when unknown."""
    if not ci or any(_unknown(v) for v in ci):
        return "-"
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]"


MODEL_NAMES = {SEARCH_STRATEGY: "cut {cut}", "probe": "frozen probe at cut {cut}",
               "full": "full fine-tuning (cut {cut})", "linear_probe": "linear probe (cut {cut})"}


def model_name(strategy: str, cut: int | None) -> str:
    """A candidate model for people: ``cut 6`` (fine-tuned), ``frozen probe at cut 4``,
    ``full fine-tuning (cut 18)``, ``lwft at cut 18``."""
    return MODEL_NAMES.get(strategy, strategy + " at cut {cut}").format(cut=cut)


def fmt_diff(diff: Any, ci: Sequence[Any] | None) -> str:
    """A paired difference with its interval, ``-0.0123 [-0.0456, 0.0210]``; ``-`` when unknown."""
    if _unknown(diff):
        return "-"
    return f"{diff:+.4f} {fmt_interval(ci)}"


def ensemble_line(answer: dict[str, Any], metric: str) -> str | None:
    """One sentence for people on the ensemble of a study's answer (``best``'s dict, or the
    report's summary of it); None when the answer is one model."""
    ensemble, cut = answer.get("ensemble"), answer["cut"]
    if not ensemble:
        return None
    test = "" if _unknown(ensemble["test"]) else f"; test {metric} {ensemble['test']:.4f} {fmt_interval(ensemble['test_ci'])}"
    val = "-" if _unknown(ensemble["val"]) else f"{ensemble['val']:.4f}"
    cuts = ensemble["cuts"]
    size = f", {fmt_count(ensemble['params'])} parameters in all" if ensemble["params"] else ""
    left_out = ensemble.get("left_out") or []
    capped = (f"; cut(s) {', '.join(map(str, left_out))} left out: the members together may cost at most "
              f"{ensemble.get('cap')}" if left_out else "")
    if ensemble["kind"] == "cuts" and len(cuts) == 1:
        only = "the best cut indistinguishable from the best that fits" if left_out else \
            "the only cut indistinguishable from the best"
        what = f"cut {cuts[0]} alone, {only} ({len(ensemble['trials'])} model(s){size}{capped})"
    elif ensemble["kind"] == "cuts":
        what = (f"the ensemble of the {len(cuts)} cuts indistinguishable from the best ({', '.join(map(str, cuts))}; "
                f"{len(ensemble['trials'])} models, class probabilities averaged{size}{capped})")
    else:
        done = "" if ensemble["complete"] else f"; {len(ensemble['seeds'])} of {ensemble['size']} seeds trained so far"
        what = (f"the ensemble of {ensemble['size']} seeds of cut {cut} (class probabilities averaged; seeds "
                f"{', '.join(map(str, ensemble['seeds'])) or '-'}{size}{done})")
    return (f"Answer: {what}: validation {metric} {val} {fmt_interval(ensemble['val_ci'])}, against the best single "
            f"cut {answer['reference_cut']} (paired) {fmt_diff(ensemble['diff'], ensemble['diff_ci'])}{test}.")
