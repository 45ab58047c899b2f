"""One trial: selection on validation, test once, costs, divergence, pruning, 3D."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from ttl_search.data import DataConfig
from ttl_search.errors import ConfigError, DataError, TTLSearchError
from ttl_search.train.trial import TrialConfig, run_trial


def _cfg(path, **kw) -> TrialConfig:
    # On the CPU wherever the tests run: they compare results exactly across runs and re-evaluate
    # on the CPU, which a GPU (non-deterministic kernels, bfloat16 autocast) would not reproduce.
    base = dict(backbone="test_cnn", weights="none", cut=5, max_epochs=4, input_size=28, latency_repeats=2,
                data=DataConfig("breastmnist", path=str(path)), device="cpu")
    base.update(kw)
    return TrialConfig(**base)


def test_checkpoint_is_selected_on_validation(breastmnist):
    result = run_trial(_cfg(breastmnist, max_epochs=5, lr=3e-3))
    assert result.status == "complete"
    assert len(result.history) == result.epochs == 5
    best = max(result.history, key=lambda h: (h["auroc"], -h["epoch"]))
    assert result.best_epoch == best["epoch"]
    assert result.val["auroc"] == best["auroc"]
    assert set(result.test) == {"auroc", "auprc", "pr_auc_trapz", "accuracy", "balanced_accuracy", "f1_macro", "loss"}
    assert result.data["test"] == 156 and result.data["md5"] == "750601b1f35ba3300ea97c75c52ff8f6"
    assert result.full["params"] > result.params and result.full["macs"] > result.macs
    assert result.latency_ms["batch1"] > 0 and result.full["latency_ms"]["batch64"] > 0


def test_predictions_recompute_the_selected_checkpoints_metrics(breastmnist):
    from ttl_search.data import load_data
    from ttl_search.train.metrics import compute_metrics
    from ttl_search.train.predictions import decode_predictions

    result = run_trial(_cfg(breastmnist, max_epochs=3, lr=3e-3, latency_repeats=0))
    data = load_data(DataConfig("breastmnist", path=str(breastmnist)))
    for split, n in (("val", 78), ("test", 156)):
        labels, probs = decode_predictions(json.loads(json.dumps(result.predictions[split])))
        assert probs.shape == (n, 2) and labels.tolist() == getattr(data, split).labels.tolist()
        recomputed = compute_metrics(labels, probs)
        for metric in ("auroc", "accuracy", "auprc"):
            assert recomputed[metric] == pytest.approx(getattr(result, split)[metric], abs=1e-4), (split, metric)


def test_same_seed_same_result_whatever_ran_before(breastmnist):
    """A reused worker process (Ray Tune's reuse_actors) trains the same model as a fresh one: the
    cached cut table must not draw from the trial's random stream (a killed study once resumed to
    a different stage-2 cut because of it)."""
    from ttl_search.models.truncation import analyze_cuts

    analyze_cuts.cache_clear()  # as in a fresh worker process
    a = run_trial(_cfg(breastmnist, max_epochs=2, latency_repeats=0))
    b = run_trial(_cfg(breastmnist, max_epochs=2, latency_repeats=0))
    c = run_trial(_cfg(breastmnist, max_epochs=2, latency_repeats=0, seed=1))
    assert a.val == b.val and a.test == b.test
    assert a.history != c.history


@pytest.mark.slow
def test_compiled_trial_learns_and_keeps_a_plain_checkpoint(breastmnist):
    """``compile: true`` trains through torch.compile; the checkpoint is the plain model's state
    dict (it loads into the uncompiled model that export and analysis build)."""
    from ttl_search.data import load_data
    from ttl_search.train.trial import prepare_trial

    cfg = _cfg(breastmnist, max_epochs=2, latency_repeats=0, compile=True)
    result = run_trial(cfg, keep_state=True)
    assert result.status == "complete" and result.val["auroc"] > 0.5
    assert not any(k.startswith("_orig_mod") for k in result.state_dict)
    model = prepare_trial(cfg, load_data(cfg.data)).built.model
    model.load_state_dict(result.state_dict, strict=True)


def test_weight_average_is_what_is_validated_selected_and_stored(breastmnist):
    """``ema``: the same training run (identical training losses) is judged on its averaged
    weights, and the stored checkpoint reproduces the selected validation metric."""
    import torch

    from ttl_search.data import load_data, make_loader
    from ttl_search.train.trial import evaluate, prepare_trial

    plain = run_trial(_cfg(breastmnist, max_epochs=3, lr=3e-3, latency_repeats=0), keep_state=True)
    cfg = _cfg(breastmnist, max_epochs=3, lr=3e-3, latency_repeats=0, ema=0.9)
    averaged = run_trial(cfg, keep_state=True)
    assert [h["train_loss"] for h in averaged.history] == [h["train_loss"] for h in plain.history]
    assert [h["auroc"] for h in averaged.history] != [h["auroc"] for h in plain.history]
    assert any(not torch.equal(averaged.state_dict[k], plain.state_dict[k]) for k in plain.state_dict)

    data = load_data(cfg.data)
    prepared = prepare_trial(cfg, data)
    model = prepared.built.model
    model.load_state_dict(averaged.state_dict, strict=True)
    loader = make_loader(data.val, prepared.transform, train=False, batch_size=256, seed=0, dims=2,
                         device=torch.device("cpu"))
    metrics, _ = evaluate(model, loader, torch.device("cpu"), torch.nn.CrossEntropyLoss())
    assert metrics["auroc"] == pytest.approx(averaged.val["auroc"], abs=1e-6)


def test_diverging_loss_fails_with_reason(breastmnist):
    result = run_trial(_cfg(breastmnist, optimizer="sgd", lr=1e30, max_epochs=3))
    assert result.status == "failed"
    assert result.reason == "diverged"


def test_callback_prunes(breastmnist):
    seen = []
    result = run_trial(_cfg(breastmnist, max_epochs=5), on_epoch=lambda e, m: seen.append((e, m["auroc"])) or e >= 2)
    assert result.status == "pruned" and result.epochs == 2
    assert [e for e, _ in seen] == [1, 2]


def test_early_stopping(breastmnist):
    result = run_trial(_cfg(breastmnist, max_epochs=30, early_stopping=2, lr=1e-6, latency_repeats=0))
    assert result.epochs < 30
    assert result.epochs - result.best_epoch == 2


def test_class_weighted_and_multiclass_options(breastmnist):
    result = run_trial(_cfg(breastmnist, class_weighted=True, optimizer="adamw", max_epochs=1, latency_repeats=0))
    assert result.status == "complete"


@pytest.mark.slow
def test_3d_trial_on_adrenalmnist3d(adrenalmnist3d):
    # a small cut and a tenth of the volumes: what matters is that a 3D trial runs end to end
    cfg = TrialConfig(backbone="r3d_18", weights="none", cut=2, max_epochs=1, batch_size=32, latency_repeats=0,
                      data=DataConfig("adrenalmnist3d", path=str(adrenalmnist3d), train_fraction=0.1))
    result = run_trial(cfg)
    assert result.status == "complete", result.reason
    assert result.in_channels == 1 and result.input_size == 28
    assert not math.isnan(result.test["auroc"])


@pytest.mark.parametrize("key,value,message", [
    ("optimizer", "rmsprop", "adam, adamw, sgd"),
    ("metric", "dice", "auroc"),
    ("backbone", "vgg", "resnet50"),
    ("cut", 99, "1..7"),
    ("device", "tpu", "cpu"),
    ("device", "cuda:x", "cuda:N"),
    ("ema", 1.0, r"ema must be a decay in \[0, 1\)"),
])
def test_bad_trial_config(key, value, message, breastmnist):
    with pytest.raises(TTLSearchError, match=message):
        _cfg(breastmnist, **{key: value})


def test_dimension_mismatch(adrenalmnist3d):
    with pytest.raises(ConfigError, match="3D"):
        run_trial(_cfg(adrenalmnist3d, data=DataConfig("adrenalmnist3d", path=str(adrenalmnist3d))))


def test_missing_data_file(tmp_path):
    with pytest.raises(DataError, match="missing.npz"):
        run_trial(_cfg(tmp_path / "missing.npz"))


def test_train_cli_writes_json(breastmnist, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "ttl_search", "train", "--quiet", "--set", "backbone=test_cnn", "--set", "weights=none",
         "--set", f"data.path={breastmnist}", "--set", "max_epochs=2", "--set", "cut=3", "--set", "latency_repeats=1",
         "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert {"val", "test", "params", "macs", "latency_ms", "epochs", "status"} <= set(result)
    assert result["status"] == "complete" and result["cut"] == 3
    assert "auroc" in proc.stdout and "parameters" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "ttl_search", "train", "--set", "max_epoch=2"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "max_epochs" in bad.stderr


def test_a_cuda_device_that_is_not_here_is_refused_with_the_valid_ones(breastmnist):
    import torch

    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: none on a machine without CUDA
    with pytest.raises(ConfigError, match=r"valid devices: auto, cpu"):
        run_trial(_cfg(breastmnist, device=missing))


def test_out_of_memory_fails_the_trial_with_its_reason_and_is_not_to_be_retried(breastmnist):
    """A device failure (here torch's out-of-memory error, injected: no GPU here) is a failed
    result with what happened, the batch sizes and what to change, marked not to be retried; the
    process (a reused Ray worker) trains the next trial normally."""
    from faults import OOM_BACKBONE, register_oom_backbone

    register_oom_backbone()
    failed = run_trial(_cfg(breastmnist, backbone=OOM_BACKBONE, cut=7, batch_size=32, max_epochs=2))
    assert failed.status == "failed" and failed.retry is False and failed.cut == 7
    for part in ("out of memory on CPU", "batch_size 32 (eval_batch_size 256)", "lower trial.batch_size",
                 "resources.gpus", "Not retried", "Tried to allocate 20.00 GiB"):
        assert part in failed.reason, (part, failed.reason)
    assert failed.to_dict()["retry"] is False and failed.device == "cpu"
    fine = run_trial(_cfg(breastmnist, backbone=OOM_BACKBONE, cut=5, max_epochs=1, latency_repeats=0))
    assert fine.status == "complete" and fine.retry is True


def test_the_test_split_is_made_only_when_it_is_scored(breastmnist):
    """During training only the train and validation splits are loaded (on a GPU they take the
    trial's memory); the test split's images are made after training, when those are gone."""
    import gc

    from ttl_search.data import BatchLoader

    seen = []

    def loaders(epoch, metrics):
        gc.collect()  # only the loaders alive now
        seen.append(sorted(len(o.images) for o in gc.get_objects() if type(o) is BatchLoader))

    result = run_trial(_cfg(breastmnist, max_epochs=2, latency_repeats=0), on_epoch=loaders)
    assert result.status == "complete" and result.data["test"] == 156
    assert seen == [[78, 546], [78, 546]]  # validation and train; never the test split's 156


def test_deterministic_trials_run_with_deterministic_algorithms_and_the_next_trial_without(breastmnist):
    import torch

    during = []

    def flags(epoch, metrics):
        during.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic))

    a = run_trial(_cfg(breastmnist, max_epochs=1, latency_repeats=0, deterministic=True), on_epoch=flags)
    b = run_trial(_cfg(breastmnist, max_epochs=1, latency_repeats=0), on_epoch=flags)
    assert a.status == b.status == "complete"
    assert during == [(True, True), (False, False)]
    assert a.val == b.val  # the CPU is deterministic either way


def test_compile_without_a_compiler_is_refused_before_training(breastmnist, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on it
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError, match=r"compile: true needs a C\+\+ compiler for Inductor .*set compile: false"):
        run_trial(_cfg(breastmnist, compile=True, max_epochs=1))
