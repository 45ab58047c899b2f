"""Restore a study's trained model from its checkpoint, and export it as TorchScript and ONNX
with a model card (JSON and Markdown).

:func:`restore_trial` rebuilds the exact model a stored trial trained (its config, seeded as the
trial was, so even random "pretrained" weights match) and loads the trial's weights-only
checkpoint. :func:`export_trial` writes:

- ``model.torchscript.pt``: ``torch.jit.trace`` of the truncated model (kept units + head),
- ``model.onnx``: the same model through ``torch.onnx.export`` (opset 17, dynamic batch axis,
  no constant folding, so every ONNX weight keeps its PyTorch name; ONNX Runtime fuses
  batch norm itself when it loads the file),
- ``model_card.json`` and ``model_card.md``.

Both files take a float32 ``N x C x H x W`` (``N x C x D x H x W`` for 3D) batch, normalised as
the card says, and return ``logits``; ``softmax(logits, dim=1)`` gives the class probabilities.
When the study's answer is an ensemble (``selection.ensemble``), the default export is the whole
ensemble (:class:`AveragedProbabilities`): its ``logits`` are the log of the members' averaged
class probabilities, so the same softmax gives the ensemble's probabilities.
Before it returns, the export runs the test split through the restored model, the TorchScript
file and the ONNX file (ONNX Runtime) and records the largest probability difference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import warnings
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from ..results import artifacts_dir, chosen_cut, open_study, stored_latency, trial_config
from ..data import DataConfig, DatasetSplits, Split, TransformConfig, load_data, make_loader
from ..data.config import CSV, FOLDER
from ..data.nifti import intensity_description
from ..errors import ConfigError, StudyError, choices
from ..train.metrics import compute_metrics
from ..search.record import SEARCH_STRATEGY, TrialRecord, fmt_diff, fmt_interval, latency_row
from ..storage import storage_url, study_trials, trial_ref
from ..search.study import StudyConfig
from ..train.trial import PreparedTrial, TrialConfig, prepare_trial, seed_everything
from ..models.truncation import input_shape
from ..models.strategies import PROBE_STRATEGY

log = logging.getLogger(__name__)

TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"
CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
ONNX_OPSET = 17
VERSION_PACKAGES = ("ttl-search", "torch", "torchvision", "numpy", "optuna", "onnx", "onnxruntime")


# ---------------------------------------------------------------------------------------------
# Restoring a trained trial


@dataclass
class RestoredTrial:
    """A stored trial's fine-tuned model, rebuilt from its config and checkpoint."""

    name: str
    """Study name."""
    storage: str
    """Storage URL of the study."""
    study: optuna.Study
    """The study."""
    config: StudyConfig
    """The study's stored config."""
    trial: FrozenTrial
    """The trial."""
    trial_config: TrialConfig
    """The exact config the trial trained with."""
    data: DatasetSplits
    """The trial's data (same splits as in training)."""
    prepared: PreparedTrial
    """The rebuilt model before loading the checkpoint; ``prepared.loaded`` still holds the
    pretrained backbone (the starting point of fine-tuning)."""
    model: nn.Module
    """The fine-tuned model (CPU, eval mode) with the checkpoint loaded."""
    checkpoint: Path
    """The checkpoint file read."""
    chosen: bool = False
    """Whether this is the trial of the search's chosen cut."""
    summary: dict[str, Any] = field(default_factory=dict)
    """``best_cut`` of the study when it has a completed search trial (else empty)."""

    @property
    def transform(self) -> TransformConfig:
        return self.prepared.transform

    @property
    def record(self) -> TrialRecord:
        return TrialRecord.from_trial(self.trial)

    @property
    def cut(self) -> int:
        return int(self.record.cut)


def _completed_numbers(trials: list[FrozenTrial]) -> str:
    return choices(trial_ref(t) for t in trials if t.state == TrialState.COMPLETE) or "none"


def parse_trial_ref(text: str | int | None) -> int | str | None:
    """A ``--trial`` argument as :func:`~ttl_search.storage.trial_ref` writes it: ``3`` (the
    study's trial 3) or ``baselines:3`` (its baselines study's)."""
    if text is None or isinstance(text, int):
        return text
    text = text.strip()
    return int(text) if text.isdigit() else text


def select_trial(name: str, study: optuna.Study, cfg: StudyConfig,
                 number: int | str | None) -> tuple[FrozenTrial, dict]:
    """The trial ``number`` (``N`` or ``baselines:N``; must be COMPLETE), or the chosen cut's best
    trial when None.

    Returns the trial and the study's ``chosen_cut`` summary (empty when it has no search trial).
    """
    number = parse_trial_ref(number)
    trials = study_trials(study)
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    if not completed:
        states = ", ".join(f"{trial_ref(t)}: {t.state.name}" for t in trials) or "no trials at all"
        raise StudyError(f"study {name!r} has no completed trial ({states}); run or resume it first")
    summary = chosen_cut(study, cfg, trials) or {}
    if number is None:
        if not summary:
            raise StudyError(f"study {name!r} has no completed search trial to choose from; pass --trial N "
                             f"(completed trials: {_completed_numbers(trials)})")
        number = summary["trial"]
    by_number = {trial_ref(t): t for t in trials}
    if isinstance(number, str) and number.startswith(f"{PROBE_STRATEGY}:") and number not in by_number:
        raise StudyError(f"the frozen probe at cut {number.split(':', 1)[1]} of study {name!r} is in its probe table "
                         "but not stored as a model (the driver stores the answer's probe when the study finishes; "
                         "this study was created without probe.run, or probed by an earlier version); export a "
                         f"stored model with --trial N (completed trials: {_completed_numbers(trials)})")
    if number not in by_number:
        raise StudyError(f"study {name!r} has no trial {number}; completed trials: {_completed_numbers(trials)}")
    trial = by_number[number]
    if trial.state != TrialState.COMPLETE:
        reason = TrialRecord.from_trial(trial).note
        raise StudyError(f"trial {number} of study {name!r} is {trial.state.name}{': ' + reason if reason else ''}; "
                         f"completed trials: {_completed_numbers(trials)}")
    return trial, summary


def find_checkpoint(name: str, trial: FrozenTrial, cfg: StudyConfig, url: str) -> Path:
    """The trial's weights file: its ``checkpoint`` attribute, else its copy in the artifact store,
    else ``<artifacts>/<study>/trial-N.pt``. A clear :class:`StudyError` when none exists."""
    base = artifacts_dir(cfg, url)
    record = TrialRecord.from_trial(trial)
    candidates: list[Path] = []
    if record.checkpoint:
        candidates.append(Path(record.checkpoint))
    if record.checkpoint_artifact_id:
        candidates.append(base / "store" / str(record.checkpoint_artifact_id))
    part = record.part
    candidates.append(base / name / (f"{part}-trial-{trial.number}.pt" if part else f"trial-{trial.number}.pt"))
    for path in candidates:
        if path.is_file():
            return path
    stored = "" if record.checkpoint else " (the trial recorded no checkpoint)"
    raise StudyError(f"checkpoint of trial {record.ref} of study {name!r} is missing{stored}; looked at "
                     f"{', '.join(str(p) for p in dict.fromkeys(candidates))}. Move the study's artifact folder "
                     f"back, or set the study's artifacts folder")


def restore_trial(name: str, storage: str | None = None, trial: int | str | None = None,
                  pretrained: bool = True) -> RestoredTrial:
    """Rebuild trial ``trial`` (``N`` or ``baselines:N``; default: the chosen cut's best trial) of
    study ``name`` with its
    fine-tuned weights. Raises :class:`StudyError` for an unknown or unfinished trial, a study
    without a completed trial, and a missing or unfitting checkpoint.

    ``pretrained=False`` skips fetching the pretrained weights (the checkpoint holds every weight
    of the fine-tuned model; only an analysis against the starting point needs them)."""
    url = storage_url(storage)
    study, cfg = open_study(name, url)
    frozen, summary = select_trial(name, study, cfg, trial)
    return _restore(name, url, study, cfg, frozen, summary, pretrained)


def _restore(name: str, url: str, study: optuna.Study, cfg: StudyConfig, frozen: FrozenTrial, summary: dict,
             pretrained: bool) -> RestoredTrial:
    """:func:`restore_trial` of an open study's completed trial ``frozen`` (``summary``: the study's
    ``chosen_cut``)."""
    checkpoint = find_checkpoint(name, frozen, cfg, url)
    tcfg = trial_config(cfg, frozen)
    data = load_data(tcfg.data)
    seed_everything(tcfg.seed)  # as run_trial does: random "pretrained" weights come out identical
    prepared = prepare_trial(tcfg if pretrained else replace(tcfg, weights="none"), data)
    model = prepared.built.model
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - unreadable or unfitting file: the user's to fix
        raise StudyError(f"checkpoint {checkpoint} of trial {trial_ref(frozen)} of study {name!r} does not fit the "
                         f"trial's model: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from exc
    model.eval()
    prepared.loaded.model.eval()
    chosen = bool(summary) and summary.get("trial") == trial_ref(frozen)
    return RestoredTrial(name, url, study, cfg, frozen, tcfg, data, prepared, model, checkpoint, chosen, summary)


@torch.no_grad()
def predict_probabilities(forward, split: Split, transform: TransformConfig, dims: int,
                          batch_size: int = 256) -> np.ndarray:
    """Class probabilities (float64, as the trial's evaluation computes them) of ``forward``
    (a callable from a float32 input batch to logits) on ``split``."""
    loader = make_loader(split, transform, train=False, batch_size=batch_size, seed=0, dims=dims)
    out = []
    for x, _ in loader:
        logits = forward(x)
        logits = torch.as_tensor(logits).float()
        out.append(torch.softmax(logits, 1).cpu())
    return torch.cat(out).numpy().astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Export


@dataclass
class ExportResult:
    """What :func:`export_trial` wrote and how well the exported files reproduce the trial."""

    output: Path
    """Folder of the exported files."""
    files: dict[str, Path]
    """``torchscript``, ``onnx``, ``card_json``, ``card_md``."""
    card: dict[str, Any]
    """The model card (as written to ``model_card.json``)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages that made (and can run) the exported files."""
    out = {"python": platform.python_version()}
    for package in VERSION_PACKAGES:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> str:
    """Write ``model`` as ONNX; returns the exporter used.

    The TorchScript-based exporter (``dynamo=False``) needs nothing beyond torch and is used while
    torch has it; otherwise the torch.export-based exporter, which needs ``onnxscript``.
    """
    dims = {"input": {0: "batch"}, "logits": {0: "batch"}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"],
                              output_names=["logits"], dynamic_axes=dims, opset_version=opset,
                              do_constant_folding=False)
        return "torch.onnx (TorchScript-based, dynamo=False)"
    except (TypeError, RuntimeError, NotImplementedError) as legacy_exc:
        try:
            import onnxscript  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"ONNX export failed with torch's TorchScript-based exporter ({legacy_exc}); the "
                              "torch.export-based exporter needs onnxscript: pip install 'ttl-search[export]'") from exc
        batch = torch.export.Dim("batch", min=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["input"],
                              output_names=["logits"], dynamic_shapes=({0: batch},), opset_version=opset,
                              external_data=False)
        return "torch.onnx (torch.export-based, dynamo=True)"


def onnx_weight_counts(onnx_model, model: nn.Module) -> dict[str, int]:
    """Values stored in an ONNX file, split into the model's parameters, its buffers (batch-norm
    running statistics) and anything else (constants the exporter created)."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    counts = {"parameter_values": 0, "buffer_values": 0, "other_values": 0}
    for tensor in onnx_model.graph.initializer:
        n = int(np.prod(tensor.dims))
        key = "parameter_values" if tensor.name in params else "buffer_values" if tensor.name in buffers else "other_values"
        counts[key] += n
    return counts


def _latency(restored: RestoredTrial) -> dict[str, Any]:
    """The model's latency for its card: from the study's quiet latency pass when it timed this
    model (median and interquartile range), else what the trial measured while training."""
    r = restored.record
    table = stored_latency(restored.study)
    row = latency_row(table, r.strategy, r.cut)
    if row:
        return {"latency_batch1_ms": row["batch1_ms"], "latency_batch1_iqr": row["batch1_iqr"],
                "latency_batch64_ms": row["batch64_ms"], "latency_device": table["device_name"],
                "latency_measured": "the study's latency pass, one model at a time"}
    return {"latency_batch1_ms": r.latency_batch1_ms, "latency_batch64_ms": r.latency_batch64_ms,
            "latency_device": r.latency_device, "latency_measured": "measured inside the trial, beside other trials"}


def _cut_summary(summary: dict, restored: RestoredTrial) -> dict[str, Any]:
    """Mean ± sd over the seeds of the exported cut (the chosen cut's summary when it is that)."""
    r = restored.record
    if summary and summary.get("cut") == r.cut and r.strategy == SEARCH_STRATEGY:
        return {"seeds": summary["seeds"], "trials": summary["trials"], "val": summary["val"],
                "val_sd": summary["val_sd"], "test": summary["test"], "test_sd": summary["test_sd"]}
    return {"seeds": [r.seed], "trials": [r.ref], "val": r.val, "test": r.test}


def build_card(restored: RestoredTrial, files: dict[str, Path], exporter: str, opset: int,
               verification: dict[str, Any], onnx_weights: dict[str, int]) -> dict[str, Any]:
    """The model card of an exported trial, as plain JSON data."""
    r = restored.record
    tcfg, cfg, data, tr = restored.trial_config, restored.config, restored.data, restored.transform
    spec = restored.prepared.loaded.spec
    cut = restored.cut
    kept = [c.name for c in spec.cuts[:cut]]
    layout = "N x C x D x H x W" if spec.dims == 3 else "N x C x H x W"
    return {
        "card": "ttl-search model card",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "study": restored.name,
        "trial": trial_ref(restored.trial),
        "chosen_by_search": restored.chosen,
        "strategy": r.strategy,
        "model": {
            "backbone": spec.name,
            "pretrained_weights": restored.trial_config.weights,
            "fine_tuned_checkpoint": str(restored.checkpoint),
            "cut": cut,
            "cut_name": r.cut_name,
            "stage": r.stage,
            "cuts_of_backbone": len(spec.cuts),
            "kept_units": kept,
            "head": f"{tcfg.head} (global average pooling + linear)" if tcfg.head == "pool" else f"{tcfg.head} + linear",
            "num_classes": data.num_classes,
        },
        "input": {
            "name": "input",
            "layout": f"float32 {layout}",
            "dims": spec.dims,
            "size": tr.input_size,
            "channels": tr.in_channels,
            "mean": list(tr.mean),
            "std": list(tr.std),
            "preprocessing": (f"resize to {tr.input_size} px per side ({'bilinear, antialiased' if spec.dims == 2 else 'trilinear'}),"
                              f" scale to [0, 1], {'replicate a gray channel to ' + str(tr.in_channels) + ' channels, ' if tr.in_channels == 3 else ''}"
                              f"subtract mean and divide by std per channel"),
        },
        "output": {"name": "logits", "shape": f"N x {data.num_classes}",
                   "probabilities": "softmax(logits, dim=1)", "class_names": list(data.class_names)},
        "data": {"dataset": data.name, "md5": data.md5 or r.dataset_md5, "task": data.task,
                 "source": data.source,
                 "stored_image_size": (cfg.trial.data.image_size if cfg.trial.data.dataset in ("folder", "csv")
                                       else cfg.trial.data.size),
                 "pixels": pixel_rules(cfg.trial.data, spec.dims),
                 "splits": {"train": len(data.train), "val": len(data.val), "test": len(data.test)}},
        "metrics": {
            "selection_metric": cfg.metric,
            "trial": {"seed": r.seed, "val": r.val, "test": r.test},
            "cut_over_seeds": _cut_summary(restored.summary, restored),
        },
        "cost": {"params": r.params, "trainable_params": r.trainable_params, "macs": r.macs,
                 **_latency(restored), "full_model_params": r.full_params, "full_model_macs": r.full_macs},
        "files": {
            "torchscript": {"path": files["torchscript"].name, "sha256": _sha256(files["torchscript"]),
                            "method": "torch.jit.trace"},
            "onnx": {"path": files["onnx"].name, "sha256": _sha256(files["onnx"]), "opset": opset,
                     "exporter": exporter, **onnx_weights},
        },
        "verification": verification,
        "versions": package_versions(),
    }


def pixel_rules(d: DataConfig, dims: int) -> str:
    """How the data's files became the stored ``uint8`` images the model was trained on (what a
    user must repeat on new files): size, intensity window or normalisation, orientation."""
    if d.dataset not in (FOLDER, CSV):
        return "the MedMNIST file's uint8 pixels as stored"
    window = d.window_values()
    if window is not None:
        preset = f" (preset {d.window})" if isinstance(d.window, str) else ""
        values = (f"window center {window[0]:g}, width {window[1]:g}{preset} on the values after the file's rescale "
                  "(Hounsfield units for CT) to 0..255, values outside clipped")
    elif dims == 2:
        values = "DICOM files: each file's VOI LUT or window center/width, else its min..max, to 0..255"
    else:
        clipped = ", values outside clipped" if d.intensity == "percentile" else ""
        values = f"{intensity_description(d)} to 0..255{clipped}"
    if dims == 2:
        return f"decoded and resized to {d.image_size} x {d.image_size} px (bilinear); {values}"
    return (f"reoriented to RAS+, resampled to {d.image_size}^3 voxels ({d.resample}: "
            f"{'voxel grid resized' if d.resample == 'plain' else 'padded to a cube in mm, then resized'}); {values}")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _trials_text(trial: str | int | list) -> str:
    """``trial 3``, or ``trials 3, 9, 10`` for an ensemble's card."""
    return f"trials {', '.join(map(str, trial))}" if isinstance(trial, list) else f"trial {trial}"


def card_markdown(card: dict[str, Any]) -> str:
    """The model card as Markdown for people."""
    m, i, o, d, c, v = card["model"], card["input"], card["output"], card["data"], card["cost"], card["verification"]
    metrics = card["metrics"]
    over = metrics["cut_over_seeds"]
    cuts = (m.get("ensemble") or {}).get("cuts") or [m["cut"]]
    lines = [
        f"# Model card: {m['backbone']} truncated at cut {m['cut']} ({m['cut_name']})" if len(set(cuts)) == 1 else
        f"# Model card: {m['backbone']} truncated at cuts {', '.join(map(str, sorted(set(cuts))))} (an ensemble)",
        "",
        f"Study `{card['study']}`, {_trials_text(card['trial'])} ({card['strategy']}"
        f"{', the cut the search chose' if card['chosen_by_search'] else ''}), exported {card['created']}.",
        "",
        "## Model",
        "",
        f"- Backbone: `{m['backbone']}`, pretrained weights `{m['pretrained_weights']}`, fine-tuned.",
        f"- Cut {m['cut']} of {m['cuts_of_backbone']} (last kept unit `{m['cut_name']}`, stage {m['stage']}); "
        f"kept units: {', '.join(f'`{u}`' for u in m['kept_units'])}. Everything above the cut is absent from the files.",
        f"- Head: {m['head']}, {m['num_classes']} classes.",
        *([f"- Ensemble of {m['ensemble']['size']} models "
           + ("of this cut" if len(set(cuts)) == 1 else f"at cuts {', '.join(map(str, cuts))}")
           + f" (trials {', '.join(map(str, card['trial']))}, seeds {', '.join(map(str, m['ensemble']['seeds']))}): "
           f"{m['ensemble']['combination']}; the files hold every member; the sizes below are the sums; the cut "
           "lines above describe the first member, at the chosen cut."] if m.get("ensemble") else []),
        f"- Parameters: {c['params']:,} (full backbone with the same head: {c['full_model_params']:,}); "
        f"MACs per image: {c['macs']:,} (full: {c['full_model_macs']:,})." if c.get("params") and c.get("full_model_params") and c.get("macs") and c.get("full_model_macs")
        else f"- Parameters: {c.get('params')}; MACs per image: {c.get('macs')}.",
        f"- Latency ({c.get('latency_measured')}) on {c.get('latency_device') or '-'}: "
        f"{_fmt(c.get('latency_batch1_ms'))} ms at batch 1"
        + (f" (interquartile range {_fmt(c['latency_batch1_iqr'][0])}-{_fmt(c['latency_batch1_iqr'][1])} ms)"
           if c.get("latency_batch1_iqr") else "") + f", {_fmt(c.get('latency_batch64_ms'))} ms at batch 64.",
        "",
        "## Input and output",
        "",
        f"- Input `{i['name']}`: {i['layout']}, {i['channels']} channel(s), {i['size']} px per side.",
        f"- Preprocessing: {i['preprocessing']}; mean {i['mean']}, std {i['std']}.",
        f"- Output `{o['name']}`: {o['shape']} logits; class probabilities are {o['probabilities']}.",
        f"- Classes (index: name): {', '.join(f'{k}: {n}' for k, n in enumerate(o['class_names']))}.",
        "",
        "## Data",
        "",
        f"- Dataset `{d['dataset']}` ({d['task']}), md5 `{d['md5']}`, from `{d['source']}`.",
        f"- Splits: {d['splits']['train']} train, {d['splits']['val']} validation, {d['splits']['test']} test.",
        *([f"- Pixels: {d['pixels']}."] if d.get("pixels") else []),
        "",
        "## Metrics",
        "",
        f"Checkpoint selected on validation {metrics['selection_metric']}. This trial (seed {metrics['trial']['seed']}):",
        "",
        "| metric | validation | test |",
        "|---|---|---|",
    ]
    for name in metrics["trial"]["val"]:
        lines.append(f"| {name} | {_fmt(metrics['trial']['val'].get(name))} | {_fmt(metrics['trial']['test'].get(name))} |")
    if metrics.get("ensemble"):
        e = metrics["ensemble"]
        lines += ["", f"The ensemble (the exported model): validation {metrics['selection_metric']} {_fmt(e['val'])} "
                  f"{fmt_interval(e['val_ci'])}, paired difference to the best single cut {e['reference_cut']} "
                  f"{fmt_diff(e['diff'], e['diff_ci'])}; test {_fmt(e['test'])} {fmt_interval(e['test_ci'])}."]
    if len(over["seeds"]) > 1:
        lines += ["", f"The same cut over seeds {over['seeds']} (trials {over['trials']}), mean ± sd:", "",
                  "| metric | validation | test |", "|---|---|---|"]
        for name in over["val"]:
            cell = lambda split: (f"{_fmt(over[split].get(name))} ± {_fmt(over.get(split + '_sd', {}).get(name))}")  # noqa: E731
            lines.append(f"| {name} | {cell('val')} | {cell('test')} |")
    lines += [
        "",
        "## Files",
        "",
        f"- `{card['files']['torchscript']['path']}`: TorchScript ({card['files']['torchscript']['method']}); "
        f"`torch.jit.load(path)`.",
        f"- `{card['files']['onnx']['path']}`: ONNX opset {card['files']['onnx']['opset']}, "
        f"{card['files']['onnx']['exporter']}, dynamic batch axis, {card['files']['onnx']['parameter_values']:,} "
        f"parameter values and {card['files']['onnx']['buffer_values']:,} batch-norm statistics; "
        f"`onnxruntime.InferenceSession(path).run(None, {{'input': x}})`.",
        "",
        f"Checked on the {v['samples']} test images: largest difference of class probabilities from the restored "
        f"PyTorch model: TorchScript {v['torchscript_max_abs_diff']:.2e}, ONNX Runtime {v['onnx_max_abs_diff']:.2e}; "
        f"test {v['metric']} recomputed from the ONNX outputs {_fmt(v['test_metric_recomputed'])} "
        f"(stored with the {'study' if m.get('ensemble') else 'trial'}: {_fmt(v['test_metric_stored'])}).",
        "",
        "## Versions",
        "",
        ", ".join(f"{k} {val}" for k, val in card["versions"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


class AveragedProbabilities(nn.Module):
    """An ensemble as one model: the log of its members' averaged class probabilities (so that
    ``softmax`` of the output is that average, and its argmax the ensemble's class)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(x), dim=1) for m in self.members]).mean(0)
        return torch.log(probs.clamp_min(1e-12))


def _ensemble_members(name: str, storage: str | None, trial: int | str | None) -> list[RestoredTrial] | None:
    """The restored members of the study's answer when it is a complete ensemble and no trial was
    asked for; None otherwise (one trial is exported)."""
    if trial is not None:
        return None
    url = storage_url(storage)
    study, cfg = open_study(name, url)
    if not cfg.selection.cut_ensemble and cfg.selection.seed_ensemble == 1:
        return None  # one model: restore_trial picks it
    trials = study_trials(study)
    summary = chosen_cut(study, cfg, trials) or {}
    ensemble = summary.get("ensemble")
    if not ensemble or (ensemble["complete"] and len(ensemble["trials"]) == 1):  # one model: exported as such
        return None
    if not ensemble["complete"]:
        of = (f"the cuts {ensemble['cuts']}" if ensemble["kind"] == "cuts" else
              f"{ensemble['size']} seeds of cut {summary['cut']}")
        raise StudyError(f"study {name!r} answers with an ensemble of {of}, but only seeds {ensemble['seeds']} "
                         f"are trained; resume it "
                         f"(`ttl-search resume {name}`), or export one member with --trial N (trials "
                         f"{', '.join(map(str, ensemble['trials']))})")
    by_ref = {trial_ref(t): t for t in trials}  # the members are the study's own (search) trials
    members = [_restore(name, url, study, cfg, by_ref[n], summary, pretrained=False) for n in ensemble["trials"]]
    # the chosen cut's members first (a stable sort): the card describes the first member's cut
    return sorted(members, key=lambda m: m.record.cut != summary["cut"])


def _ensemble_card(card: dict[str, Any], members: list[RestoredTrial]) -> dict[str, Any]:
    """The card of the first member, made the ensemble's: its trials, summed size, the ensemble's
    metrics (from the study's answer), and latency marked as one member's."""
    summary = members[0].summary
    ensemble = summary["ensemble"]
    records_ = [m.record for m in members]
    card["trial"] = [trial_ref(m.trial) for m in members]
    card["model"]["ensemble"] = {"size": len(members), "seeds": [r.seed for r in records_],
                                 "cuts": [r.cut for r in records_],
                                 "checkpoints": [str(m.checkpoint) for m in members],
                                 "combination": "the mean of the members' softmax probabilities"}
    card["model"]["fine_tuned_checkpoint"] = card["model"]["ensemble"]["checkpoints"]
    card["output"]["probabilities"] = "softmax(logits, dim=1): the members' averaged probabilities"
    card["metrics"]["ensemble"] = {k: ensemble[k] for k in ("val", "val_ci", "test", "test_ci", "diff", "diff_ci")}
    card["metrics"]["ensemble"]["reference_cut"] = summary["reference_cut"]
    for key in ("params", "trainable_params", "macs"):
        values = [getattr(r, key) for r in records_]
        card["cost"][key] = sum(values) if all(v is not None for v in values) else None
    card["cost"]["latency_measured"] = f"{card['cost']['latency_measured']} (one member; the ensemble runs {len(members)})"
    return card


def export_trial(name: str, storage: str | None = None, trial: int | str | None = None,
                 output: str | Path | None = None, opset: int = ONNX_OPSET) -> ExportResult:
    """Export trial ``trial`` (default: the study's answer: the chosen cut's best trial, or the
    whole ensemble when the answer is one) of study ``name`` to ``output`` as TorchScript and ONNX
    with a model card."""
    import onnx
    import onnxruntime as ort

    if output is None:
        raise ConfigError("export needs an output folder (--output DIR)")
    members = _ensemble_members(name, storage, trial)
    restored = members[0] if members else restore_trial(name, storage, trial, pretrained=False)
    out = Path(output).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    model, tr, spec = restored.model, restored.transform, restored.prepared.loaded.spec
    if members:
        model = AveragedProbabilities([m.model for m in members]).eval()
    example = torch.randn(2, *input_shape(spec, tr.input_size, tr.in_channels))
    files = {"torchscript": out / TORCHSCRIPT_FILE, "onnx": out / ONNX_FILE, "card_json": out / CARD_JSON,
             "card_md": out / CARD_MD}

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example)
    traced.save(str(files["torchscript"]))
    exporter = _export_onnx(model, example, files["onnx"], opset)
    onnx_model = onnx.load(str(files["onnx"]))
    onnx.checker.check_model(onnx_model)
    onnx_weights = onnx_weight_counts(onnx_model, model)

    # Verification on the whole test split: restored model vs. the two files as a user loads them.
    test, dims = restored.data.test, restored.data.dims
    reference = predict_probabilities(model, test, tr, dims)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates TorchScript loading
        loaded_ts = torch.jit.load(str(files["torchscript"]))
    ts_probs = predict_probabilities(loaded_ts, test, tr, dims)
    session = ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    onnx_probs = predict_probabilities(lambda x: session.run(None, {"input": x.numpy()})[0], test, tr, dims)
    metric = restored.config.metric
    recomputed = compute_metrics(test.labels.numpy(), onnx_probs).get(metric)
    verification = {
        "split": "test", "samples": len(test),
        "torchscript_max_abs_diff": float(np.abs(ts_probs - reference).max()),
        "onnx_max_abs_diff": float(np.abs(onnx_probs - reference).max()),
        "metric": metric, "test_metric_recomputed": recomputed,
        "test_metric_stored": restored.summary["ensemble"]["test"] if members else restored.record.test.get(metric),
    }
    worst = max(verification["torchscript_max_abs_diff"], verification["onnx_max_abs_diff"])
    if worst > 1e-4:
        log.warning("exported files differ from the restored model by up to %.2e in probability", worst)
    card = build_card(restored, files, exporter, opset, verification, onnx_weights)
    if members:
        card = _ensemble_card(card, members)
    files["card_json"].write_text(json.dumps(card, indent=2) + "\n")
    files["card_md"].write_text(card_markdown(card))
    log.info("exported trial(s) %s of study %s to %s", card["trial"], name, out)
    return ExportResult(out, files, card)
