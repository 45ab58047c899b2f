"""The probe phase end to end: `ttl-search probe`, a guided study on Ray, the best probe as a
model of its own (best, compare, export), on real BreastMNIST and the tiny test backbone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from studyutil import DEBUG_STUDY, cli, cli_env

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def data_root():
    from conftest import SHARED_DATASETS

    if not (SHARED_DATASETS / "breastmnist.npz").is_file():
        pytest.skip(f"real data file {SHARED_DATASETS / 'breastmnist.npz'} is absent")
    return SHARED_DATASETS


def _cli(*args, cwd, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ttl_search", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(), cwd=str(cwd))


@pytest.fixture(scope="module")
def guided(tmp_path_factory, data_root):
    """A finished guided debug study (budget 3) and its storage URL."""
    root = tmp_path_factory.mktemp("guided")
    url = f"sqlite:///{root / 'g.db'}"
    done = _cli("run", DEBUG_STUDY, "--storage", url, "--quiet", "--set", "name=guided",
                "--set", f"trial.data.root={data_root}", "--set", "search.method=guided", "--set", "search.budget=3",
                "--set", "trial.weights=none", cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    return {"url": url, "root": root, "out": done.stdout}


def test_probe_command_prints_the_stored_table(guided):
    """`ttl-search probe` on a study that has its probe (here: run as the guided study's first phase,
    on a Ray worker) prints the stored table, computing nothing. Computing it from the command line
    is covered by tests/test_packaging.py (every format of every command)."""
    args = ("probe", DEBUG_STUDY, "--storage", guided["url"], "--set", "name=guided")
    first = cli(*args, "--format", "json")
    assert first.returncode == 0, first.stderr
    rows = json.loads(first.stdout)
    assert [r["cut"] for r in rows] == list(range(1, 8))  # every valid cut of test_cnn at 28 px
    for row in rows:
        assert {"cut", "name", "params", "probe_val", "probe_val_ci", "knn_val", "logme", "seconds"} <= set(row)
        low, high = row["probe_val_ci"]
        assert low <= row["probe_val"] <= high
    table = cli(*args)
    assert table.returncode == 0 and "stored earlier in study guided" in table.stdout
    from ttl_search.results import open_study, stored_probe

    study, _ = open_study("guided", guided["url"])
    assert [r["probe_val"] for r in stored_probe(study)["rows"]] == [r["probe_val"] for r in rows]


def test_a_study_created_by_probe_keeps_the_probe(tmp_path, data_root):
    from ttl_search.results import open_study
    from ttl_search.run.driver import probe_study
    from ttl_search.search.study import load_study_config

    url = f"sqlite:///{tmp_path / 'p.db'}"
    cfg = load_study_config(DEBUG_STUDY, [f"storage={url}", "name=probed", f"trial.data.root={data_root}",
                                          f"artifacts={tmp_path / 'a'}"])
    study, table, computed = probe_study(cfg)
    assert computed and table["best_cut"] in range(1, 8)
    study, stored = open_study("probed", url)
    assert stored.probe.run  # its best probe is a model of the study, and `resume` keeps probing it
    assert not study.trials  # the probe's model is in the baselines study; the study waits for its search
    probe_trials = optuna.load_study(study_name="probed:baselines", storage=url).trials
    assert len(probe_trials) == 1 and probe_trials[0].state == TrialState.COMPLETE
    assert probe_trials[0].user_attrs["strategy"] == "probe" and probe_trials[0].params == {
        "cut": table["best_cut"]}  # one strategy in the baselines study; the probe's cut varies
    assert (tmp_path / "a" / "probed" / f"probe-cut-{table['best_cut']}.pt").is_file()
    assert probe_study(cfg)[2] is False  # stored: not computed again


def test_guided_study_trains_within_its_budget_and_lists_the_probe(guided):
    from ttl_search.results import best_cut, open_study, stored_probe

    study, cfg = open_study("guided", guided["url"])
    table = stored_probe(study)
    assert table is not None and len(table["rows"]) == 7
    ttl = study.trials
    assert all(set(t.params) == {"cut"} for t in ttl)  # the search alone: nothing that never varies
    assert len(ttl) == 3 and all(t.state == TrialState.COMPLETE for t in ttl)
    phases = [t.user_attrs["phase"] for t in ttl]
    assert phases.count("guided1") == 2 and phases.count("guided2") == 1
    first = {t.params["cut"] for t in ttl if t.user_attrs["phase"] == "guided1"}
    order = [r["cut"] for r in sorted(table["rows"], key=lambda r: (-r["probe_val"], r["params"]))]
    assert order[0] in first  # the probe's best cut is trained first
    best = best_cut("guided", guided["url"])
    probe_rows = {r["cut"]: r for r in best["ranking"] if r["strategy"] == "probe"}
    assert sorted(probe_rows) == [r["cut"] for r in table["rows"]]  # the probe at every cut is a candidate
    assert str(probe_rows[table["best_cut"]]["trials"][0]).startswith("baselines:")  # the stored model
    assert all(r["trials"] == [f"probe:{c}"] for c, r in probe_rows.items() if c != table["best_cut"] and not r["chosen"])
    assert all(r["val_ci"] is not None for r in probe_rows.values())  # an interval like every other model's
    assert "frozen probe" in guided["out"]  # the run's answer shows the probe beside the cuts


def test_status_and_report_show_the_probe_beside_the_fine_tuned_cuts(guided):
    status = cli("status", "guided", "--storage", guided["url"])
    assert status.returncode == 0, status.stderr
    assert "frozen probe of test_cnn" in status.stdout and "fine-tuned val auroc" in status.stdout
    report = cli("report", "guided", "--storage", guided["url"], "--no-attach", "--output", guided["root"] / "rep")
    assert report.returncode == 0, report.stderr
    text = (guided["root"] / "rep" / "summary.md").read_text()
    assert "## Frozen probe" in text and "(best probe)" in text


def test_the_best_probe_exports_and_predicts_what_the_probe_predicted(guided, tmp_path):
    from ttl_search.export import restore_trial
    from ttl_search.export import predict_probabilities
    from ttl_search.results import open_study
    from ttl_search.search.record import trial_predictions
    from ttl_search.storage import study_trials

    study, _ = open_study("guided", guided["url"])
    trial = next(t for t in study_trials(study) if t.user_attrs["strategy"] == "probe")
    restored = restore_trial("guided", guided["url"], f"baselines:{trial.number}")
    probs = predict_probabilities(restored.model, restored.data.val, restored.transform, restored.data.dims)
    _, stored = trial_predictions(trial, "val")
    assert probs == pytest.approx(stored, abs=1e-4)  # the checkpoint is the probe itself
    out = cli("export", "guided", "--storage", guided["url"], "--trial", trial.number, "--output", tmp_path / "x")
    assert out.returncode == 0, out.stderr
    assert any(p.suffix == ".onnx" for p in (tmp_path / "x").iterdir())


def test_probe_settings_are_checked():
    from ttl_search.errors import ConfigError
    from ttl_search.search.study import load_study_config

    with pytest.raises(ConfigError, match="probe.run does not work with search.method tpe"):
        load_study_config(DEBUG_STUDY, ["search.method=tpe", "probe.run=true"])
    with pytest.raises(ConfigError, match="trial.head must be pool"):
        load_study_config(DEBUG_STUDY, ["search.method=guided", "trial.head=flatten"])
    with pytest.raises(ConfigError, match="unknown config key 'probe.k'"):
        load_study_config(DEBUG_STUDY, ["probe.k=3"])
    assert os.path.isfile(DEBUG_STUDY)


def test_an_answer_that_is_a_frozen_probe_is_stored_as_a_model(tmp_path, data_root):
    """The answer is the frozen probe at a cut that no trial holds: the driver stores that probe as
    a trial with its checkpoint (from the head the probe stored), and export restores it."""
    import numpy as np
    import torch

    from ttl_search.export import restore_trial
    from ttl_search.results import PROBE_PREDICTIONS_ATTR, best_cut, open_study, stored_candidates, study_system_attr
    from ttl_search.run.driver import probe_study
    from ttl_search.run.probe import PROBE_HEADS_ATTR, decode_head, store_answer_probe
    from ttl_search.search.record import PREDICTIONS_ATTR, TrialRecord
    from ttl_search.search.samplers import job_distributions
    from ttl_search.search.study import load_study_config
    from ttl_search.train.predictions import decode_predictions, encode_predictions

    url = f"sqlite:///{tmp_path / 'p.db'}"
    cfg = load_study_config(DEBUG_STUDY, [f"storage={url}", "name=probe-answer", f"trial.data.root={data_root}",
                                          f"artifacts={tmp_path / 'a'}", "selection.rule=best"])
    study, table, _ = probe_study(cfg)
    heads = study_system_attr(study, PROBE_HEADS_ATTR)
    assert sorted(map(int, heads)) == [r["cut"] for r in table["rows"]]  # every cut's head, not only the best's
    cut = next(r["cut"] for r in table["rows"] if r["cut"] != table["best_cut"])
    predictions = study_system_attr(study, PROBE_PREDICTIONS_ATTR)
    labels, _ = decode_predictions(predictions[str(cut)]["val"])
    perfect = np.eye(2)[labels]  # this cut's probe now validates best: the answer
    predictions[str(cut)]["val"] = encode_predictions(labels, perfect)
    study._storage.set_study_system_attr(study._study_id, PROBE_PREDICTIONS_ATTR, predictions)
    chance = np.full((labels.size, 2), 0.5)
    stored, cfg = open_study("probe-answer", url)
    candidates = stored_candidates(stored, cfg)
    dists = job_distributions(candidates, ["ttl"], 1, 1, [c.index for c in candidates])
    record = TrialRecord(strategy="ttl", cut=1, repeat=0, val={"auroc": 0.5}, test={"auroc": 0.5}, params=1)
    stored.add_trial(optuna.trial.create_trial(
        params={"cut": 1}, distributions={"cut": dists["cut"]}, value=0.5, user_attrs=record.to_attrs(),
        system_attrs={PREDICTIONS_ATTR: {"val": encode_predictions(labels, chance),
                                         "test": predictions[str(cut)]["test"]}}))
    best = best_cut("probe-answer", url)
    assert (best["strategy"], best["cut"], best["trial"]) == ("probe", cut, f"probe:{cut}")

    assert store_answer_probe(stored, cfg, tmp_path / "a") == cut
    assert store_answer_probe(stored, cfg, tmp_path / "a") is None  # stored once
    best = best_cut("probe-answer", url)
    assert best["strategy"] == "probe" and best["cut"] == cut and str(best["trial"]).startswith("baselines:")
    assert (tmp_path / "a" / "probe-answer" / f"probe-cut-{cut}.pt").is_file()
    restored = restore_trial("probe-answer", url)
    weight, bias = decode_head(heads[str(cut)])
    assert torch.equal(restored.model.head.fc.weight.detach(), torch.tensor(weight))
    assert torch.equal(restored.model.head.fc.bias.detach(), torch.tensor(bias))
