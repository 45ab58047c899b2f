"""Transferability analysis: how much fine-tuning changed each kept unit (SVCCA and linear CKA).

Representations are matrices of ``samples x features``. Both measures center every feature first.

- **SVCCA** (Raghu et al., 2017): an SVD of each representation keeps the top directions that
  explain ``keep`` (default 99%) of its variance; CCA between the two reduced representations
  gives canonical correlations in [0, 1]. We report their mean and the sorted curve. SVCCA is
  invariant to any invertible linear transform of the kept subspace.
- **Linear CKA** (Kornblith et al., 2019): ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``;
  invariant to orthogonal transforms and isotropic scaling, not to arbitrary linear maps.

Both are biased upwards when samples are few compared with features, so every comparison comes
with a random-feature baseline: the same measure between one representation and the other with
its samples shuffled (or, optionally, Gaussian noise of the same shape). A value near the baseline
means "no more similar than unrelated features".

Convolutional maps (``N x C x *spatial``) become matrices as :attr:`SVCCAOptions.spatial` says:
``positions`` (every spatial position of every image is a sample, channels are features),
``subsample`` (``positions_per_image`` random positions per image, the same ones on both sides),
or ``pool`` (global average pooling, one sample per image). Two maps of different sizes (units
of different stages) are first average-pooled to the smaller grid, so a sample covers the same
image region on both sides.

:func:`run_svcca` compares, on a held-out sample of a study's data, (a) the pretrained and the
fine-tuned model at every unit up to the trial's cut, (b) every pair of units of the fine-tuned
model, and (c) the random-feature baseline; it writes CSV tables and PNG plots.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from ..data import Split
from ..errors import ConfigError, choices
from ..storage import study_trials, trial_ref

log = logging.getLogger(__name__)

SPATIAL_MODES = ("positions", "subsample", "pool")
BASELINES = ("shuffled", "gaussian")
SPLITS = ("test", "val")


# ---------------------------------------------------------------------------------------------
# Measures


def _as_matrix(x: Any) -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if a.ndim != 2:
        raise ConfigError(f"a representation must be a samples x features matrix, got shape {a.shape}")
    if a.shape[0] < 2:
        raise ConfigError(f"a representation needs at least 2 samples, got {a.shape[0]}")
    return a


def _center(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=0, keepdims=True)


@dataclass
class Reduced:
    """The SVD step of SVCCA: an orthonormal basis of the kept directions."""

    basis: np.ndarray
    """``samples x kept`` orthonormal columns spanning the kept directions of the centered data."""
    kept: int
    """Directions kept."""
    rank: int
    """Numerical rank of the centered data (directions with non-zero variance)."""
    features: int
    """Features of the input."""


def svd_reduce(x: Any, keep: float = 0.99) -> Reduced:
    """Center ``x`` and keep its top singular directions explaining ``keep`` of the variance.

    ``keep=1`` keeps every direction with non-zero variance (numerical rank).
    """
    if not 0 < keep <= 1:
        raise ConfigError(f"keep must be in (0, 1], got {keep}")
    a = _center(_as_matrix(x))
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    tol = (s[0] if s.size else 0.0) * max(a.shape) * np.finfo(np.float64).eps
    rank = int((s > tol).sum())
    if rank == 0:
        return Reduced(u[:, :0], 0, 0, a.shape[1])
    var = s[:rank] ** 2
    if keep >= 1:
        k = rank
    else:
        k = int(np.searchsorted(np.cumsum(var) / var.sum(), keep - 1e-12) + 1)
        k = min(max(k, 1), rank)
    return Reduced(u[:, :k], k, rank, a.shape[1])


def cca_of_bases(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Canonical correlations (descending) between the column spaces of two orthonormal bases."""
    if a.shape[1] == 0 or b.shape[1] == 0:
        return np.zeros(0)
    return np.clip(np.linalg.svd(a.T @ b, compute_uv=False), 0.0, 1.0)


def cca(x: Any, y: Any) -> np.ndarray:
    """Canonical correlations (descending) between ``x`` and ``y`` (no SVD truncation)."""
    return cca_of_bases(svd_reduce(x, 1.0).basis, svd_reduce(y, 1.0).basis)


@dataclass
class SVCCAResult:
    """SVCCA of two representations."""

    mean: float
    """Mean canonical correlation (NaN when a side has no variance)."""
    coefficients: np.ndarray
    """Canonical correlations, largest first; ``min(kept_x, kept_y)`` of them."""
    kept_x: int
    """Directions the SVD step kept of ``x``."""
    kept_y: int
    """Directions the SVD step kept of ``y``."""
    samples: int
    """Samples (rows) compared."""


def _svcca_from(rx: Reduced, ry: Reduced) -> SVCCAResult:
    rho = cca_of_bases(rx.basis, ry.basis)
    return SVCCAResult(float(rho.mean()) if rho.size else float("nan"), rho, rx.kept, ry.kept, rx.basis.shape[0])


def svcca(x: Any, y: Any, keep: float = 0.99) -> SVCCAResult:
    """SVCCA between ``x`` and ``y`` (``samples x features`` each, same samples in the same order)."""
    x, y = _as_matrix(x), _as_matrix(y)
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"representations must have the same samples, got {x.shape[0]} and {y.shape[0]}")
    return _svcca_from(svd_reduce(x, keep), svd_reduce(y, keep))


def linear_cka(x: Any, y: Any) -> float:
    """Linear CKA between ``x`` and ``y`` (same samples in the same order); NaN without variance."""
    x, y = _center(_as_matrix(x)), _center(_as_matrix(y))
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"representations must have the same samples, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[1] + y.shape[1] <= x.shape[0]:  # feature space: cheaper when features are few
        num = np.linalg.norm(y.T @ x) ** 2
        den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    else:  # Gram matrices: cheaper when samples are few
        k, l = x @ x.T, y @ y.T
        num = float((k * l).sum())
        den = np.linalg.norm(k) * np.linalg.norm(l)
    return float(num / den) if den > 0 else float("nan")


@dataclass
class Baseline:
    """Similarity of unrelated representations of the same shapes (averaged over repeats)."""

    svcca: float
    """Mean SVCCA coefficient."""
    cka: float
    """Linear CKA."""
    coefficients: np.ndarray
    """Mean sorted SVCCA coefficient curve."""


def random_baseline(x: Any, y: Any, keep: float = 0.99, kind: str = "shuffled", repeats: int = 3,
                    seed: int = 0) -> Baseline:
    """SVCCA and CKA between ``x`` and a random partner of ``y``'s shape.

    ``shuffled``: ``y`` with its samples permuted (same features and spectrum, no correspondence
    with ``x``); ``gaussian``: independent standard normal features.
    """
    if kind not in BASELINES:
        raise ConfigError(f"unknown baseline {kind!r}; valid baselines: {choices(BASELINES)}")
    x, y = _as_matrix(x), _as_matrix(y)
    rx = svd_reduce(x, keep)
    ry = svd_reduce(y, keep) if kind == "shuffled" else None
    rng = np.random.default_rng(seed)
    means, ckas, curves = [], [], []
    for _ in range(max(1, repeats)):
        if kind == "shuffled":  # the SVD step commutes with a permutation of the samples
            perm = rng.permutation(y.shape[0])
            partner = Reduced(ry.basis[perm], ry.kept, ry.rank, ry.features)
            ycka = y[perm]
        else:
            ycka = rng.standard_normal(y.shape)
            partner = svd_reduce(ycka, keep)
        result = _svcca_from(rx, partner)
        means.append(result.mean)
        curves.append(result.coefficients)
        ckas.append(linear_cka(x, ycka))
    length = min(len(c) for c in curves)
    curve = np.mean([c[:length] for c in curves], axis=0) if length else np.zeros(0)
    return Baseline(float(np.mean(means)), float(np.mean(ckas)), curve)


# ---------------------------------------------------------------------------------------------
# Convolutional maps


def pool_to(t: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Average-pool ``N x C x *spatial`` to ``grid`` (unchanged when it already has that size)."""
    grid = tuple(int(g) for g in grid)
    if t.dim() <= 2 or tuple(t.shape[2:]) == grid:
        return t
    pool = F.adaptive_avg_pool2d if t.dim() == 4 else F.adaptive_avg_pool3d
    return pool(t, grid)


def shrink(t: torch.Tensor, max_grid: int) -> torch.Tensor:
    """Average-pool maps larger than ``max_grid`` per spatial axis down to it (memory)."""
    if t.dim() <= 2 or max_grid <= 0 or max(t.shape[2:]) <= max_grid:
        return t
    return pool_to(t, [min(s, max_grid) for s in t.shape[2:]])


def common_grid(a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...]:
    """The smaller spatial size of two maps, axis by axis."""
    return tuple(min(x, y) for x, y in zip(a.shape[2:], b.shape[2:]))


def position_index(images: int, positions: int, per_image: int, seed: int) -> np.ndarray | None:
    """Row indices (image * positions + position) of ``per_image`` random positions per image,
    or None for every position."""
    if per_image <= 0 or per_image >= positions:
        return None
    rng = np.random.default_rng(seed)
    picks = np.stack([rng.choice(positions, size=per_image, replace=False) for _ in range(images)])
    return (np.arange(images)[:, None] * positions + np.sort(picks, axis=1)).ravel()


def to_samples(t: torch.Tensor, mode: str, rows: np.ndarray | None = None) -> np.ndarray:
    """A map ``N x C x *spatial`` (or ``N x C``) as a ``samples x C`` float64 matrix.

    ``pool``: one sample per image (spatial mean); ``positions``/``subsample``: one sample per
    spatial position (image-major), restricted to ``rows`` when given.
    """
    if mode not in SPATIAL_MODES:
        raise ConfigError(f"unknown spatial mode {mode!r}; valid modes: {choices(SPATIAL_MODES)}")
    t = t.detach().float()
    if t.dim() == 2:
        samples = t
    elif mode == "pool":
        samples = t.flatten(2).mean(-1)
    else:
        samples = t.flatten(2).transpose(1, 2).reshape(-1, t.shape[1])
    if rows is not None:
        samples = samples[torch.as_tensor(rows)]
    return samples.double().numpy()


# ---------------------------------------------------------------------------------------------
# Running the analysis on a study


@dataclass
class SVCCAOptions:
    """How :func:`run_svcca` samples and compares representations."""

    samples: int = 500
    """Images in the held-out sample (seeded draw from ``split``; all of it when smaller)."""
    split: str = "test"
    """Held-out split the sample comes from: ``test`` or ``val`` (never the training split)."""
    spatial: str = "subsample"
    """Convolutional maps as samples: ``positions`` (every spatial position of every image),
    ``subsample`` (``positions_per_image`` random positions per image) or ``pool`` (global
    average pooling, one sample per image)."""
    positions_per_image: int = 16
    """``subsample``: spatial positions drawn per image (the same on both sides of a comparison)."""
    keep: float = 0.99
    """Share of the variance the SVD step of SVCCA keeps (1 keeps every direction)."""
    max_grid: int = 16
    """Maps larger than this per spatial axis are average-pooled down to it when recorded (memory);
    0 records them at full size."""
    max_rows: int = 50_000
    """At most this many samples per comparison; more are subsampled at random."""
    baseline: str = "shuffled"
    """Random-feature baseline: ``shuffled`` (the pretrained representation with its samples
    permuted) or ``gaussian`` (independent standard normal features of the same shape)."""
    baseline_repeats: int = 3
    """Random draws the baseline averages."""
    seed: int = 0
    """Seed of the image sample, the positions and the baseline."""
    batch_size: int = 128
    """Images per forward pass."""

    def __post_init__(self) -> None:
        if self.spatial not in SPATIAL_MODES:
            raise ConfigError(f"spatial {self.spatial!r} is unknown; valid modes: {choices(SPATIAL_MODES)}")
        if self.split not in SPLITS:
            raise ConfigError(f"split {self.split!r} is not a held-out split; valid splits: {choices(SPLITS)}")
        if self.baseline not in BASELINES:
            raise ConfigError(f"baseline {self.baseline!r} is unknown; valid baselines: {choices(BASELINES)}")
        if not 0 < self.keep <= 1:
            raise ConfigError(f"keep must be in (0, 1], got {self.keep}")
        for key in ("samples", "positions_per_image", "max_rows", "baseline_repeats", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.samples < 2:
            raise ConfigError(f"samples must be >= 2, got {self.samples}")
        if self.max_grid < 0:
            raise ConfigError(f"max_grid must be >= 0, got {self.max_grid}")

    def describe(self) -> str:
        """How maps became samples, in words (for plots and tables)."""
        if self.spatial == "pool":
            return "conv maps globally average-pooled (one sample per image)"
        if self.spatial == "positions":
            return "every spatial position of every image is a sample"
        return f"{self.positions_per_image} random spatial positions per image are samples"


@dataclass
class SVCCARun:
    """What :func:`run_svcca` computed and wrote."""

    units: pd.DataFrame
    """(a)+(c): per unit up to the cut, pretrained vs fine-tuned SVCCA/CKA, baseline, and the
    validation metric of the cut at that unit."""
    pairs: pd.DataFrame
    """(b): every pair of units of the fine-tuned model."""
    coefficients: pd.DataFrame
    """Sorted SVCCA coefficient curves per unit (pretrained vs fine-tuned, and baseline)."""
    files: dict[str, Path] = field(default_factory=dict)
    """Written CSV, PNG and JSON files by kind."""
    context: dict[str, Any] = field(default_factory=dict)
    """Study, trial, cut, options, sample size."""


def held_out_sample(split: Split, samples: int, seed: int) -> tuple[Split, np.ndarray]:
    """A seeded random subset of ``samples`` images of ``split`` (all of it when smaller)."""
    n = len(split)
    if n < 2:
        raise ConfigError(f"the held-out split has {n} image(s); SVCCA needs at least 2")
    if samples >= n:
        idx = np.arange(n)
    else:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=samples, replace=False))
    sample = split.take(idx)
    return Split(sample.pixels(), sample.labels), idx


@torch.no_grad()
def unit_activations(units: Sequence[nn.Module], loader, max_grid: int) -> list[torch.Tensor]:
    """Outputs of every unit (run in sequence) on every batch of ``loader``, shrunk to ``max_grid``."""
    outs: list[list[torch.Tensor]] = [[] for _ in units]
    for x, _ in loader:
        h = x
        for i, unit in enumerate(units):
            h = unit(h)
            outs[i].append(shrink(h, max_grid).float().cpu())
    return [torch.cat(o) for o in outs]


class _Comparer:
    """Turns pairs of maps into matrices (same rows on both sides) and caches the SVD step."""

    def __init__(self, opts: SVCCAOptions) -> None:
        self.opts = opts
        self._rows: dict[tuple, np.ndarray | None] = {}
        self._cache: dict[tuple, tuple[np.ndarray, Reduced]] = {}

    def rows(self, images: int, grid: tuple[int, ...]) -> np.ndarray | None:
        key = (images, grid)
        if key not in self._rows:
            o = self.opts
            positions = math.prod(grid) if o.spatial != "pool" else 1
            idx = position_index(images, positions, o.positions_per_image, o.seed) if o.spatial == "subsample" else None
            total = images * positions if idx is None else len(idx)
            if total > o.max_rows:
                keep = np.sort(np.random.default_rng(o.seed + 1).choice(total, size=o.max_rows, replace=False))
                idx = keep if idx is None else idx[keep]
            self._rows[key] = idx
        return self._rows[key]

    def matrix(self, key: tuple, t: torch.Tensor, grid: tuple[int, ...]) -> tuple[np.ndarray, Reduced]:
        if self.opts.spatial == "pool":
            grid = ()  # global average pooling needs no common grid
        full_key = (key, grid)
        if full_key not in self._cache:
            pooled = pool_to(t, grid) if grid else t
            x = to_samples(pooled, self.opts.spatial, self.rows(t.shape[0], grid))
            self._cache[full_key] = (x, svd_reduce(x, self.opts.keep))
        return self._cache[full_key]

    def compare(self, ka: tuple, a: torch.Tensor, kb: tuple, b: torch.Tensor) -> tuple[SVCCAResult, float, np.ndarray, np.ndarray]:
        grid = common_grid(a, b)
        xa, ra = self.matrix(ka, a, grid)
        xb, rb = self.matrix(kb, b, grid)
        return _svcca_from(ra, rb), linear_cka(xa, xb), xa, xb


def _val_by_cut(trials, metric: str) -> dict[int, tuple[float, float, int]]:
    from ..report.tables import cut_metrics

    frame = cut_metrics(trials, metric)
    return {int(r.cut): (r.val_mean, r.val_sd, int(r.n)) for r in frame.itertuples()}


FROZEN_STRATEGIES = ("probe", "linear_probe")
"""Strategies that change no pretrained unit: nothing for SVCCA to compare."""


def fine_tuned_trial(name: str, storage: str | None = None) -> int | str | None:
    """The trial SVCCA analyses by default: the answer's, unless the answer changed no pretrained
    unit (a frozen probe, a linear probe); then the first trial of the best fine-tuned cut. None
    while the study has no answer."""
    from ..results import chosen_cut, open_study

    best = chosen_cut(*open_study(name, storage))
    if best is None:
        return None  # restore_trial says why there is nothing to analyse
    if best["strategy"] not in FROZEN_STRATEGIES:
        return best["trial"]
    tuned = [r for r in best["ranking"] if r["strategy"] not in FROZEN_STRATEGIES]
    return tuned[0]["trials"][0] if tuned else best["trial"]


def run_svcca(name: str, storage: str | None = None, trial: int | str | None = None,
              options: SVCCAOptions | None = None, output: str | Path | None = None,
              attach: bool = True) -> SVCCARun:
    """Pretrained vs fine-tuned (every unit up to the cut), unit vs unit (fine-tuned), and the
    random-feature baseline, on a held-out sample of the study's data; writes CSVs and PNGs to
    ``output`` (default ``<artifacts>/<study>/svcca-trial-N``). ``trial`` defaults to
    :func:`fine_tuned_trial`."""
    from ..results import artifacts_dir
    from ..data import make_loader
    from ..export import restore_trial
    from ..report import attach_files
    from ..report.plots import plot_svcca

    opts = options or SVCCAOptions()
    restored = restore_trial(name, storage, trial if trial is not None else fine_tuned_trial(name, storage))
    cut = restored.cut
    spec = restored.prepared.loaded.spec
    split = getattr(restored.data, opts.split)
    sample, _ = held_out_sample(split, opts.samples, opts.seed)
    loader = make_loader(sample, restored.transform, train=False, batch_size=opts.batch_size, seed=0,
                         dims=restored.data.dims)
    fine_units = list(restored.model.features.children())[:cut]
    pre_units = [module for _, _, module in restored.prepared.loaded.units[:cut]]
    for module in fine_units + pre_units:
        module.eval()
    fine = unit_activations(fine_units, loader, opts.max_grid)
    pre = unit_activations(pre_units, loader, opts.max_grid)
    val = _val_by_cut(study_trials(restored.study), restored.config.metric)
    comparer = _Comparer(opts)

    unit_rows, coef_rows = [], []
    for i in range(cut):
        c = spec.cuts[i]
        res, cka_value, xa, xb = comparer.compare(("fine", i), fine[i], ("pre", i), pre[i])
        base = random_baseline(xa, xb, opts.keep, opts.baseline, opts.baseline_repeats, opts.seed + i)
        v = val.get(c.index, (float("nan"), float("nan"), 0))
        unit_rows.append({
            "unit": c.index, "unit_name": c.name, "stage": c.stage, "stage_end": c.stage_end,
            "svcca": res.mean, "cka": cka_value, "baseline_svcca": base.svcca, "baseline_cka": base.cka,
            "kept_finetuned": res.kept_x, "kept_pretrained": res.kept_y, "channels": int(fine[i].shape[1]),
            "grid": "x".join(map(str, fine[i].shape[2:])) or "-", "samples": res.samples,
            f"val_{restored.config.metric}": v[0], f"val_{restored.config.metric}_sd": v[1], "val_seeds": v[2],
        })
        if res.samples <= 2 * max(res.kept_x, res.kept_y):
            log.warning("unit %s: %d samples for %d kept directions; SVCCA is biased upwards (compare with the "
                        "baseline, or use more samples / spatial positions)", c.name, res.samples, max(res.kept_x, res.kept_y))
        for rank, value in enumerate(res.coefficients, start=1):
            coef_rows.append({"unit": c.index, "unit_name": c.name, "comparison": "pretrained_vs_finetuned",
                              "rank": rank, "coefficient": float(value)})
        for rank, value in enumerate(base.coefficients, start=1):
            coef_rows.append({"unit": c.index, "unit_name": c.name, "comparison": f"baseline_{opts.baseline}",
                              "rank": rank, "coefficient": float(value)})

    pair_rows = []
    for i in range(cut):
        for j in range(i, cut):
            res, cka_value, _, _ = comparer.compare(("fine", i), fine[i], ("fine", j), fine[j])
            pair_rows.append({"unit_a": spec.cuts[i].index, "name_a": spec.cuts[i].name, "unit_b": spec.cuts[j].index,
                              "name_b": spec.cuts[j].name, "svcca": res.mean, "cka": cka_value,
                              "samples": res.samples, "grid": "x".join(map(str, common_grid(fine[i], fine[j]))) or "-"})

    units, pairs, coefficients = pd.DataFrame(unit_rows), pd.DataFrame(pair_rows), pd.DataFrame(coef_rows)
    out = Path(output) if output else artifacts_dir(restored.config, restored.storage) / name / f"svcca-trial-{str(trial_ref(restored.trial)).replace(':', '-')}"
    out = out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    r = restored.record
    context = {
        "study": name, "trial": trial_ref(restored.trial), "strategy": r.strategy, "seed": r.seed,
        "chosen_by_search": restored.chosen, "backbone": spec.name, "weights": restored.prepared.loaded.weights,
        "cut": cut, "cut_name": r.cut_name, "metric": restored.config.metric,
        "dataset": restored.data.name, "split": opts.split, "images": len(sample), "options": asdict(opts),
        "spatial_note": opts.describe(),
        "stage_ends": [c.index for c in spec.cuts if c.stage_end],
        "cuts": [{"index": c.index, "name": c.name, "stage": c.stage} for c in spec.cuts],
        "val_by_cut": {str(k): {"mean": m, "sd": s, "seeds": n} for k, (m, s, n) in val.items()},
    }
    files = {"units_csv": out / "svcca_units.csv", "pairs_csv": out / "svcca_pairs.csv",
             "coefficients_csv": out / "svcca_coefficients.csv", "json": out / "svcca.json"}
    units.to_csv(files["units_csv"], index=False)
    pairs.to_csv(files["pairs_csv"], index=False)
    coefficients.to_csv(files["coefficients_csv"], index=False)
    files["json"].write_text(json.dumps({**context, "units": unit_rows, "pairs": pair_rows}, indent=2, default=float) + "\n")
    files.update(plot_svcca(units, pairs, coefficients, context, out))
    if attach:
        attach_files(restored.study, restored.config, restored.storage,
                     [p for k, p in files.items() if k.endswith("_png")])
    log.info("svcca of trial %s of study %s written to %s", trial_ref(restored.trial), name, out)
    return SVCCARun(units, pairs, coefficients, files, context)
