"""Study configuration (YAML in ``studies/``) and what follows from it: the cuts the search may
train and the sampler that implements the configured search.

Resolution: command-line overrides > file > defaults. The resolved config is stored in the
study's user attributes, so ``resume`` rebuilds exactly the same search from the database.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

from ..models.backbones import get_backbone, stage_ends
from ..config import load_config
from ..errors import ConfigError, choices
from ..train.metrics import metric_direction
from .schedulers import SCHEDULERS
from .record import SEARCH_STRATEGY
from .answer import study_answer
from .samplers import GUIDES, SEARCH_METHODS, CutCandidate, check_search, probe_ranking
from .budget import feasible
from .selection import ENSEMBLE_CUTS, SelectionConfig
from ..models.strategies import BASELINES, PROBE_STRATEGY, STRATEGIES
from ..train.probe import ProbeConfig
from ..train.trial import TrialConfig
from ..models.truncation import analyze_cuts



@dataclass
class SearchConfig:
    """How the cut points are searched."""

    RENAMED: ClassVar[dict[str, str]] = {"strategy": "method"}
    """Keys of earlier versions: using one is an error that names the new key."""

    method: str = "two_stage"
    """``two_stage`` (the paper), ``exhaustive`` (every valid cut), ``tpe`` (Optuna's TPE with a
    budget), ``guided`` (the frozen probe ranks the cuts, a few are trained) or ``none`` (only the
    baselines)."""
    top_k: int = 1
    """two_stage: how many of the best stages stage 2 searches."""
    tolerance: float = 0.0
    """Candidates within this much of the best validation metric go to the smaller model."""
    repeats: int = 1
    """Seeds per chosen cut (the paper used 3); decisions use the mean."""
    budget: int | None = None
    """Trainings the search may spend: tpe, its trials (default 10); guided, the cuts it trains
    (default 5; each ``repeats`` x folds times)."""
    initial: int = 2
    """guided: cuts trained first (the probe's best, not next to each other); then the search
    trains the untried neighbours of the best trained cut until they are trained or the budget is
    spent."""
    guide: str = "probe_val"
    """guided: the probe score that ranks the cuts: ``probe_val`` (logistic regression on the frozen
    pooled features, validation metric), ``knn_val`` or ``logme``."""
    tune_lr: bool = False
    """tpe: also search the learning rate and weight decay."""
    max_retries: int = 2
    """Retries of a failed training (same cut and seed) before it is given up."""
    seed: int = 0
    """Seed of repeat 0; repeat r trains with seed + r."""


@dataclass
class ResourcesConfig:
    """Resources of one trial on the Ray cluster."""

    cpus: float = 1.0
    """CPUs per trial (also its torch thread count)."""
    gpus: float = 0.0
    """GPUs per trial; fractions (0.5) let trials share a GPU (scheduling only, memory is shared)."""


@dataclass
class SchedulerConfig:
    """Ray Tune trial scheduler."""

    type: str = "fifo"
    """``fifo`` (every trial runs to the end) or ``asha`` (stop weak trials early; stored as PRUNED)."""
    grace_period: int = 1
    """asha: epochs before a trial may be stopped."""
    reduction_factor: int = 2
    """asha: keep the best 1/reduction_factor at each rung."""


@dataclass
class DriverConfig:
    """How the driver holds its study and rides out outages of the study database."""

    heartbeat_s: float = 10.0
    """Seconds between the driver's heartbeats in the study database (its lease on the study)."""
    stale_after_s: float = 60.0
    """A driver whose last heartbeat is older than this is taken for dead: ``resume`` takes its
    study over, and ``status`` calls its RUNNING trials orphaned (on the driver's own host, a
    driver whose process is gone is known dead at once)."""
    storage_patience_s: float = 300.0
    """How long the driver retries a lost database connection (with backoff, said on the progress
    line) before it stops; running trainings go on meanwhile."""


@dataclass
class StudyConfig:
    """A study: one search of the cut points of one backbone on one dataset."""

    name: str = "study"
    """Study name (unique in the storage)."""
    storage: str | None = None
    """SQLAlchemy URL of the study database; default ``$TTL_SEARCH_STORAGE`` or
    ``sqlite:///ttl-search.db`` in the working directory."""
    trial: TrialConfig = field(default_factory=TrialConfig)
    """Settings of every trial (backbone, weights, data, epochs...); cut, strategy and seed are
    set per trial by the search."""
    metric: str = "auroc"
    """Validation metric the search optimises (also selects each trial's checkpoint)."""
    direction: str | None = None
    """``maximize`` or ``minimize``; default: the metric's natural direction."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """How the cuts are searched."""
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    """How the answer is chosen from the trained cuts: the rule, its bootstrap intervals, and
    optional k-fold cross-validation."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """The frozen probe: every cut scored from one forward pass of the pretrained backbone (run
    before a guided search, or before any search with ``probe.run``)."""
    baselines: list[str] = field(default_factory=list)
    """Baselines trained alongside the search: ``full``, ``linear_probe``, ``lwft``,
    ``transfusion``, ``scratch``. A new study stores them (and the frozen probe's model) in its
    baselines study ``NAME:baselines``; every reading command reads the two as one."""
    baseline_cuts: dict[str, int] = field(default_factory=dict)
    """Cut per baseline; default: the last cut, for TransFusion the end of the middle stage."""
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    """Resources per trial."""
    concurrency: int = 1
    """Maximum trials running at once."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Ray Tune scheduler (multi-fidelity)."""
    ray_address: str | None = None
    """Ray cluster to join (``auto`` or ``host:port``); default ``$RAY_ADDRESS`` or a local Ray
    started for the study."""
    artifacts: str | None = None
    """Folder for checkpoints and plots; default ``<database folder>/ttl-artifacts``."""
    driver: DriverConfig = field(default_factory=DriverConfig)
    """The driver's lease on the study (one driver per study) and its patience with the database."""

    def __post_init__(self) -> None:
        validate_study_config(self)

    @property
    def resolved_direction(self) -> str:
        return self.direction or metric_direction(self.metric)

    @property
    def seed_count(self) -> int:
        """Seeds (repeats) a trial of this study may train with: the search's ``repeats``, or the
        ensemble's size when larger (its extra seeds are trained at the chosen cut alone)."""
        return max(self.search.repeats, self.selection.seed_ensemble)


def validate_study_config(cfg: StudyConfig) -> None:
    """Checks across keys; messages name the key and the valid choices."""
    if not isinstance(cfg.name, str) or not cfg.name.strip():
        raise ConfigError("name must be a non-empty string")
    metric_direction(cfg.metric)
    if cfg.direction not in (None, "maximize", "minimize"):
        raise ConfigError(f"direction {cfg.direction!r} is unknown; valid directions: maximize, minimize")
    cfg.trial.metric = cfg.metric
    check_search(cfg.search.method)
    if cfg.trial.data.folds not in (1, cfg.selection.folds):
        raise ConfigError(f"trial.data.folds is set by selection.folds; set selection.folds: {cfg.trial.data.folds} "
                          "instead")
    cfg.trial.data.folds = cfg.selection.folds
    if cfg.selection.folds > 1 and not SEARCH_METHODS[cfg.search.method].takes_folds:
        folding = [m for m, spec in SEARCH_METHODS.items() if spec.takes_folds]
        raise ConfigError(f"selection.folds > 1 does not work with search.method {cfg.search.method}; methods that "
                          f"cross-validate: {choices(folding)}")
    if cfg.selection.cut_ensemble and cfg.search.method == "none":
        raise ConfigError(f"selection.ensemble {ENSEMBLE_CUTS} averages the searched TTL cuts, and search.method none "
                          f"searches none; set selection.ensemble: 1, or a search method: "
                          f"{choices(m for m in SEARCH_METHODS if m != 'none')}")
    if cfg.selection.seed_ensemble > 1 and not SEARCH_METHODS[cfg.search.method].takes_ensemble:
        ensembling = [m for m, spec in SEARCH_METHODS.items() if spec.takes_ensemble]
        raise ConfigError(f"selection.ensemble > 1 does not work with search.method {cfg.search.method}; methods that "
                          f"train the chosen cut's other seeds: {choices(ensembling)}")
    for key in ("repeats", "budget", "top_k", "initial"):
        if getattr(cfg.search, key) is not None and getattr(cfg.search, key) < 1:
            raise ConfigError(f"search.{key} must be >= 1, got {getattr(cfg.search, key)}")
    if cfg.search.max_retries < 0:
        raise ConfigError(f"search.max_retries must be >= 0, got {cfg.search.max_retries}")
    for b in cfg.baselines:
        if b not in BASELINES:
            raise ConfigError(f"baselines: unknown baseline {b!r}; valid baselines: {choices(BASELINES)}")
    for b in cfg.baseline_cuts:
        if b not in cfg.baselines:
            raise ConfigError(f"baseline_cuts: {b!r} is not among baselines ({choices(cfg.baselines) or 'none'})")
    spec = get_backbone(cfg.trial.backbone)
    for b in cfg.baselines:
        if not STRATEGIES[b].supports(spec.family):
            raise ConfigError(f"baselines: {b} does not support backbone {spec.name} (it supports the "
                              f"{choices(STRATEGIES[b].families)} families)")
    if cfg.search.method == "none" and not cfg.baselines:
        raise ConfigError("search.method none runs only baselines, but baselines is empty")
    if cfg.concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {cfg.concurrency}")
    if cfg.resources.cpus <= 0 or cfg.resources.gpus < 0:
        raise ConfigError(f"resources: cpus must be > 0 and gpus >= 0, got {cfg.resources}")
    if cfg.resources.gpus > 1 and not float(cfg.resources.gpus).is_integer():
        raise ConfigError(f"resources.gpus above 1 must be a whole number, got {cfg.resources.gpus}")
    d = cfg.driver
    if d.heartbeat_s <= 0 or d.storage_patience_s < 0 or d.stale_after_s < 3 * d.heartbeat_s:
        raise ConfigError(f"driver: heartbeat_s must be > 0, stale_after_s at least 3 x heartbeat_s and "
                          f"storage_patience_s >= 0, got {d}")
    if cfg.search.guide not in GUIDES:
        raise ConfigError(f"search.guide {cfg.search.guide!r} is unknown; valid guides: {choices(GUIDES)}")
    if needs_probe(cfg):
        if cfg.search.method == "tpe":
            raise ConfigError("probe.run does not work with search.method tpe (TPE would learn from the probe's "
                              "stored model); methods that can run the probe first: "
                              f"{choices(m for m in SEARCH_METHODS if m != 'tpe')}")
        if cfg.trial.head != "pool":
            raise ConfigError(f"the frozen probe works on pooled features: trial.head must be pool with "
                              f"{'probe.run' if cfg.probe.run else 'search.method guided'}, got {cfg.trial.head!r}")
    if cfg.scheduler.type not in SCHEDULERS:
        raise ConfigError(f"scheduler.type {cfg.scheduler.type!r} is unknown; valid schedulers: {choices(SCHEDULERS)}")


def upgrade_stored_config(values: dict[str, Any]) -> dict[str, Any]:
    """A config stored by an earlier version, in today's keys (``search.strategy`` is
    ``search.method`` now); the user's own files get an error for old keys instead."""
    search = values.get("search")
    if isinstance(search, dict):
        for old, new in SearchConfig.RENAMED.items():
            if old in search and new not in search:
                search = {(new if k == old else k): v for k, v in search.items()}
        values = {**values, "search": search}
    return values


def load_study_config(path: str | Path | None, overrides: Sequence[str] = (), extra: dict[str, Any] | None = None) -> StudyConfig:
    """Defaults < YAML file < ``extra`` < ``key=value`` overrides."""
    return load_config(StudyConfig, path, overrides, extra)


# ---------------------------------------------------------------------------------------------


def resolve_paths(cfg: StudyConfig) -> None:
    """Make data paths absolute (Ray workers run in other folders), the data root included."""
    from ..data import default_data_root

    data = cfg.trial.data
    if data.path:
        data.path = str(Path(data.path).expanduser().resolve())
    data.root = str(Path(data.root or default_data_root()).expanduser().resolve())
    if cfg.artifacts:
        cfg.artifacts = str(Path(cfg.artifacts).expanduser().resolve())
    budget = cfg.selection.budget
    if budget.latency_table:
        budget.latency_table = str(Path(budget.latency_table).expanduser().resolve())


def model_input(cfg: TrialConfig) -> tuple[int, int]:
    """(input size, input channels) a trial will use, known without loading the data."""
    spec = get_backbone(cfg.backbone)
    data = cfg.data
    native = data.image_size if data.dataset in ("folder", "csv") else data.size
    size = cfg.input_size or native
    channels = cfg.in_channels or (3 if spec.dims == 2 else 1)
    return size, channels


def cut_candidates(cfg: StudyConfig) -> list[CutCandidate]:
    """The cuts the search may train: every cut that works at the study's input size."""
    size, channels = model_input(cfg.trial)
    rows = analyze_cuts(cfg.trial.backbone, size, 2, channels, cfg.trial.head)
    valid = [CutCandidate(r.index, r.name, r.stage, r.params, r.macs) for r in rows if r.valid]
    if not valid:
        raise ConfigError(f"no cut of {cfg.trial.backbone} works at {size} px input; raise trial.input_size")
    return valid


def baseline_cut(cfg: StudyConfig, baseline: str, candidates: Sequence[CutCandidate]) -> int:
    """The cut a baseline trains at (valid at the input size)."""
    valid = {c.index for c in candidates}
    if baseline in cfg.baseline_cuts:
        cut = cfg.baseline_cuts[baseline]
    elif baseline == "transfusion":
        ends = [e for e in stage_ends(get_backbone(cfg.trial.backbone)) if e in valid]
        cut = ends[max(0, math.ceil(len(ends) / 2) - 1)] if ends else max(valid)
    else:
        cut = len(get_backbone(cfg.trial.backbone).cuts)
    if cut not in valid:
        raise ConfigError(
            f"baseline {baseline} needs cut {cut}, which is not valid at this input size; "
            f"valid cuts: {choices(sorted(valid))} (set baseline_cuts.{baseline} or trial.input_size)"
        )
    return cut


def needs_probe(cfg: StudyConfig) -> bool:
    """Whether the study runs the frozen probe before its search (and stores its model): a guided
    search always, else as ``probe.run`` says (by default before a two-stage or exhaustive search
    with a pool head)."""
    method = SEARCH_METHODS[cfg.search.method]
    if method.needs_probe:
        return True
    if cfg.probe.run is None:
        return method.probes_by_default and cfg.trial.head == "pool"
    return cfg.probe.run


def make_sampler(cfg: StudyConfig, candidates: Sequence[CutCandidate] | None = None,
                 probe: dict[str, Any] | None = None):
    """The sampler of the configured search, built from the config alone (no stored state), the
    study's cut candidates (default: computed from the config, a forward pass per cut; the search
    trains only those within the budget, see :mod:`~ttl_search.search.budget`) and, for a
    guided search, the study's stored probe table (``probe``; None while it is not stored)."""
    candidates = list(candidates) if candidates is not None else cut_candidates(cfg)
    method = SEARCH_METHODS[cfg.search.method]
    if cfg.baselines and not method.takes_baselines:
        raise ConfigError(f"the {method.name} search cannot schedule baselines; run them in a sibling study with "
                          "search.method none")
    baselines = [(b, baseline_cut(cfg, b, candidates)) for b in cfg.baselines]  # a comparison, over budget or not
    ranking = probe_ranking(probe["rows"], cfg.search.guide, cfg.resolved_direction) if probe else None
    sampler = method.build(feasible(candidates), cfg.resolved_direction, cfg.search, baselines, cfg.selection.folds,
                           ranking=ranking, ensemble=cfg.selection.seed_ensemble,
                           chooser=lambda trials: _chosen_ttl_cut(study_answer(trials, cfg, candidates)))
    sampler.study_candidates = candidates
    """Every valid cut of the study (the baselines train at theirs, over budget or not)."""
    return sampler


def _chosen_ttl_cut(answer) -> int | None:
    """The cut whose seeds an ensemble phase trains: the answer's, when it is a fine-tuned cut."""
    return answer.pick if answer.strategy == SEARCH_STRATEGY else None


def trial_strategies(cfg: StudyConfig) -> list[str]:
    """Values of the ``strategy`` parameter in this study (the same list in every trial)."""
    probe = [PROBE_STRATEGY] if needs_probe(cfg) else []
    return ([SEARCH_STRATEGY] if cfg.search.method != "none" else []) + list(cfg.baselines) + probe


def splits_baselines(cfg: StudyConfig) -> bool:
    """Whether a new study keeps its baselines (and the frozen probe's model) in a baselines study
    ``NAME:baselines`` beside it: every study that searches and has any. The study itself then
    holds the search alone, so that optuna-dashboard's plots, best-so-far line and "Best Trial"
    show the search; the baselines study's page shows the baselines by themselves."""
    return cfg.search.method != "none" and any(s != SEARCH_STRATEGY for s in trial_strategies(cfg))


def part_space(cfg: StudyConfig, candidates: Sequence[CutCandidate], strategy: str,
               split: bool) -> tuple[list[str], list[int]]:
    """(strategies, cuts) that the study holding trials of ``strategy`` stores: with ``split`` (the
    study has a baselines study), the search's in the study and the others' in the baselines
    study, else every strategy in the one study; every candidate cut where the search or the
    probe trains (the candidates within the study's budget) and the baselines' own cuts, else the
    baselines' own cuts (``candidates``: every valid cut, over budget or not)."""
    strategies = trial_strategies(cfg)
    if split:
        strategies = [s for s in strategies if (s == SEARCH_STRATEGY) == (strategy == SEARCH_STRATEGY)]
    baselines = {baseline_cut(cfg, s, candidates) for s in strategies if s in cfg.baselines}
    if SEARCH_STRATEGY in strategies or PROBE_STRATEGY in strategies:
        return strategies, sorted({c.index for c in feasible(candidates)} | baselines)
    return strategies, sorted(baselines)
