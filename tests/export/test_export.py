"""Per-trial checkpoints, restoring a trained trial, and `export` (TorchScript, ONNX, model card)
on a real debug study."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from ttl_search.errors import StudyError
from ttl_search.export import export_trial, predict_probabilities, restore_trial
from ttl_search.results import stored_latency
from ttl_search.search.record import latency_row, records
from ttl_search.storage import study_trials

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exported(study, tmp_path_factory):
    name, url = study
    out = tmp_path_factory.mktemp("export")
    return export_trial(name, url, output=out)


def _trials(name: str, url: str):
    return optuna.load_study(study_name=name, storage=url).trials


def test_every_completed_trial_stores_its_checkpoint(study):
    from optuna.artifacts import get_all_artifact_meta

    from ttl_search.results import artifacts_dir, open_study

    name, url = study
    s, cfg = open_study(name, url)
    base = artifacts_dir(cfg, url)
    assert Path(url.removeprefix("sqlite:///")).parent / "ttl-artifacts" == base  # next to the database
    for t in s.trials:
        assert t.state == optuna.trial.TrialState.COMPLETE
        path = Path(t.user_attrs["checkpoint"])
        assert path.is_file() and path.parent == base / name
        state = torch.load(path, weights_only=True)
        assert all(k.startswith(("features.", "head.")) for k in state)
        metas = get_all_artifact_meta(t, storage=s._storage)
        assert [m.artifact_id for m in metas] == [t.user_attrs["checkpoint_artifact_id"]]
        assert (base / "store" / metas[0].artifact_id).read_bytes() == path.read_bytes()


def test_restored_trial_reproduces_its_test_metrics(study):
    from ttl_search.train.metrics import compute_metrics

    name, url = study
    probe = next(r.ref for r in records(study_trials(optuna.load_study(study_name=name, storage=url)))
                 if r.strategy == "linear_probe")
    assert isinstance(probe, str) and probe.startswith("baselines:")  # in the baselines study
    for number in (0, probe):  # a TTL cut and the linear probe
        restored = restore_trial(name, url, number)
        t = restored.trial
        assert restored.cut == t.user_attrs["cut"]
        probs = predict_probabilities(restored.model, restored.data.test, restored.transform, restored.data.dims)
        metrics = compute_metrics(restored.data.test.labels.numpy(), probs)
        for key in ("auroc", "auprc", "accuracy"):
            assert metrics[key] == pytest.approx(t.user_attrs[f"test_{key}"], abs=1e-9)


def test_exported_models_reproduce_the_trial(study, exported):
    import onnxruntime as ort

    from ttl_search.results import best_cut
    from ttl_search.train.metrics import compute_metrics

    name, url = study
    best = best_cut(name, url)
    card = exported.card
    assert card["trial"] == best["trial"] and card["chosen_by_search"]
    restored = restore_trial(name, url)
    test, tr, dims = restored.data.test, restored.transform, restored.data.dims
    reference = predict_probabilities(restored.model, test, tr, dims)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(exported.files["torchscript"]))
    scripted.eval()
    ts_probs = predict_probabilities(scripted, test, tr, dims)
    session = ort.InferenceSession(str(exported.files["onnx"]), providers=["CPUExecutionProvider"])
    onnx_probs = predict_probabilities(lambda x: session.run(None, {"input": x.numpy()})[0], test, tr, dims)
    assert np.abs(ts_probs - reference).max() < 1e-4
    assert np.abs(onnx_probs - reference).max() < 1e-4
    # ... and these are the trial's test predictions: they give its stored test metrics.
    stored = restored.trial.user_attrs
    assert compute_metrics(test.labels.numpy(), onnx_probs)["auroc"] == pytest.approx(stored["test_auroc"], abs=1e-6)
    assert compute_metrics(test.labels.numpy(), ts_probs)["auprc"] == pytest.approx(stored["test_auprc"], abs=1e-6)
    assert card["verification"]["onnx_max_abs_diff"] < 1e-4


def test_exported_files_hold_only_the_kept_layers(study, exported):
    import onnx

    name, url = study
    restored = restore_trial(name, url)
    params = restored.trial.user_attrs["params"]
    cut = restored.cut
    assert params < restored.trial.user_attrs["full_params"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(exported.files["torchscript"]))
    assert sum(p.numel() for p in scripted.parameters()) == params
    kept = {f"features.{name.replace('.', '_')}." for name, _, _ in restored.prepared.loaded.units[:cut]}
    dropped = {f"features.{name.replace('.', '_')}." for name, _, _ in restored.prepared.loaded.units[cut:]}
    assert all(k.startswith(tuple(kept) + ("head.",)) for k in scripted.state_dict())

    model = onnx.load(str(exported.files["onnx"]))
    own = dict(restored.model.named_parameters())
    initializers = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    assert sum(n for k, n in initializers.items() if k in own) == params
    assert set(own) <= set(initializers)
    assert not [k for k in initializers if k.startswith(tuple(dropped))]
    assert exported.card["files"]["onnx"]["parameter_values"] == params


def test_model_card(study, exported):
    name, url = study
    card = json.loads(exported.files["card_json"].read_text())
    t = [t for t in _trials(name, url) if t.number == card["trial"]][0]
    a = t.user_attrs
    m, i, d = card["model"], card["input"], card["data"]
    assert (m["backbone"], m["cut"], m["cut_name"], m["pretrained_weights"]) == ("test_cnn", a["cut"], a["cut_name"], "none")
    assert m["kept_units"][-1] == a["cut_name"] and len(m["kept_units"]) == a["cut"]
    assert (i["size"], i["channels"]) == (28, 3)
    assert i["mean"] == pytest.approx([0.485, 0.456, 0.406]) and i["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert card["output"]["class_names"] == ["malignant", "normal, benign"]
    assert (d["dataset"], d["md5"]) == ("breastmnist", a["dataset_md5"])
    assert d["pixels"] == "the MedMNIST file's uint8 pixels as stored"
    assert "- Pixels: the MedMNIST file's uint8 pixels as stored." in exported.files["card_md"].read_text()
    assert card["metrics"]["trial"]["test"]["auroc"] == a["test_auroc"]
    assert card["metrics"]["trial"]["val"]["auroc"] == a["val_auroc"] and card["metrics"]["trial"]["seed"] == a["seed"]
    assert card["metrics"]["cut_over_seeds"]["seeds"] == [a["seed"]]
    assert (card["cost"]["params"], card["cost"]["macs"]) == (a["params"], a["macs"])
    timed = latency_row(stored_latency(optuna.load_study(study_name=name, storage=url)), "ttl", a["cut"])
    assert card["cost"]["latency_batch1_ms"] == timed["batch1_ms"] and card["cost"]["latency_batch1_iqr"] == \
        timed["batch1_iqr"]
    assert "the study's latency pass, one model at a time" in exported.files["card_md"].read_text()
    assert {"torch", "onnx", "onnxruntime", "ttl-search", "python"} <= set(card["versions"])
    md = exported.files["card_md"].read_text()
    assert f"truncated at cut {a['cut']} ({a['cut_name']})" in md and "0: malignant, 1: normal, benign" in md
    assert "750601b1f35ba3300ea97c75c52ff8f6" in md


def test_export_errors(study, tmp_path, capsys):
    from ttl_search.cli import main

    name, url = study
    with pytest.raises(StudyError, match=r"no trial 42; completed trials: 0, 1, 2, 3, 4, baselines:0, baselines:1"):
        export_trial(name, url, 42, tmp_path)
    assert main(["export", name, "--storage", url, "--trial", "42", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no trial 42" in err

    cfg = dict(optuna.load_study(study_name=name, storage=url).user_attrs["config"], name="no-trials-export")
    empty = optuna.create_study(study_name="no-trials-export", storage=url, load_if_exists=True)
    empty.set_user_attr("config", cfg)
    with pytest.raises(StudyError, match="no completed trial"):
        export_trial("no-trials-export", url, output=tmp_path)


def test_missing_checkpoint(study):
    from ttl_search.results import artifacts_dir, open_study

    name, url = study
    s, cfg = open_study(name, url)
    t = s.trials[1]
    checkpoint = Path(t.user_attrs["checkpoint"])
    copy = artifacts_dir(cfg, url) / "store" / t.user_attrs["checkpoint_artifact_id"]
    moved = [(p, p.with_name(p.name + ".moved")) for p in (checkpoint, copy)]
    try:
        checkpoint.rename(moved[0][1])
        assert restore_trial(name, url, 1).checkpoint == copy  # the artifact store's copy stands in
        copy.rename(moved[1][1])
        with pytest.raises(StudyError, match=r"checkpoint of trial 1 of study 'debug' is missing; looked at") as info:
            restore_trial(name, url, 1)
        assert str(checkpoint) in str(info.value) and str(copy) in str(info.value)
    finally:
        for original, aside in moved:
            if aside.exists():
                aside.rename(original)


def test_an_unfinished_ensemble_is_not_exported_as_the_answer(tmp_path):
    """selection.ensemble=3 with only the search's seed trained: export names what is missing and
    how to finish it, before it reads any checkpoint."""
    from studyutil import DEBUG_STUDY, synthetic_study
    from ttl_search.search.study import load_study_config

    cfg = load_study_config(DEBUG_STUDY, ["search.method=exhaustive", "selection.ensemble=3", "name=unfinished"])
    study, _ = synthetic_study(cfg, {1: 0.2, 2: 0.4, 3: 0.8, 4: 2.9, 5: 3.0, 6: 3.05, 7: 2.95})
    url = f"sqlite:///{tmp_path / 'ens.db'}"
    optuna.copy_study(from_study_name="unfinished", from_storage=study._storage, to_storage=url)
    with pytest.raises(StudyError, match=r"ensemble of 3 seeds of cut 4, but only seeds \[0\] are trained; resume it "
                                         r"\(`ttl-search resume unfinished`\), or export one member with --trial N"):
        export_trial("unfinished", url, output=tmp_path / "out")


def test_the_card_says_how_files_became_pixels():
    """A DICOM study's window and a NIfTI study's orientation, resampling and intensity rule are in
    the card: what a user must repeat on new files."""
    from ttl_search.data import DataConfig
    from ttl_search.export import pixel_rules

    ct = pixel_rules(DataConfig(dataset="csv", path="m.csv", image_size=64, window="abdomen"), 2)
    assert ct.startswith("decoded and resized to 64 x 64 px") and "window center 50, width 400 (preset abdomen)" in ct
    own = pixel_rules(DataConfig(dataset="folder", path="x", image_size=32), 2)
    assert "each file's VOI LUT or window center/width, else its min..max" in own
    mr = pixel_rules(DataConfig(dataset="csv", path="m.csv", image_size=32, resample="spacing", intensity="percentile",
                                percentiles=[1, 99]), 3)
    assert mr.startswith("reoriented to RAS+, resampled to 32^3 voxels (spacing: padded to a cube in mm")
    assert "percentiles 1..99 to 0..255" in mr
