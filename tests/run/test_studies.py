"""Real studies: the CLI on a local Ray cluster, SQLite and PostgreSQL, killed drivers and workers,
the dashboard reading while the study writes, and ASHA pruning."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from studyutil import DEBUG_STUDY, cli, complete_keys, kill_group, run_cli, start_driver, trials, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Short but not instant trials, one thread each, two at a time: deterministic and killable.
BASE = ["--set", "trial.max_epochs=3", "--set", "concurrency=2", "--quiet"]


def _study_args(name: str, url: str, data: Path, *extra: str) -> list[str]:
    return ["run", str(DEBUG_STUDY), "--storage", url, "--set", f"name={name}", "--set", f"trial.data.root={data}",
            *BASE, *extra]


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'studies.db'}"
    url = os.environ.get("TTL_SEARCH_TEST_POSTGRES")
    if not url:
        pytest.skip("TTL_SEARCH_TEST_POSTGRES is not set (.ci/run starts PostgreSQL and sets it)")
    return url


def _best(name: str, url: str, log: Path) -> dict:
    proc = cli("best", name, "--storage", url, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shared_datasets_dir_module):
    """An uninterrupted run of the debug study: the answer every resumed run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    url = f"sqlite:///{tmp / 'ref.db'}"
    log = tmp / "driver.log"
    rc = run_cli(_study_args("ref", url, shared_datasets_dir_module), log)
    assert rc == 0, log.read_text()[-3000:]
    return {"url": url, "log": log, "best": _best("ref", url, log), "trials": trials("ref", url)}


@pytest.fixture(scope="module")
def shared_datasets_dir_module():
    from conftest import SHARED_DATASETS

    if not (SHARED_DATASETS / "breastmnist.npz").is_file():
        pytest.skip(f"real data file {SHARED_DATASETS / 'breastmnist.npz'} is absent")
    return SHARED_DATASETS


def test_debug_study_end_to_end(reference):
    ts = reference["trials"]
    assert [t.state for t in ts] == [TrialState.COMPLETE] * len(ts)
    phases = [t.user_attrs["phase"] for t in ts]
    assert phases.count("stage1") == 3 and set(phases) <= {"stage1", "stage2"}
    stage1 = {t.user_attrs["cut"] for t in ts if t.user_attrs["phase"] == "stage1"}
    assert stage1 == {3, 5, 7}
    best = reference["best"]
    assert {"cut", "cut_name", "stage", "val", "test", "params"} <= set(best)
    assert best["finished"] and best["cut"] in {t.user_attrs["cut"] for t in ts}
    first = max((t for t in ts if t.user_attrs["phase"] == "stage1"), key=lambda t: t.value)
    winner_stage = first.user_attrs["stage"]  # stage 2 searches the stage of the best stage-1 mean
    stage2 = {t.user_attrs["cut"] for t in ts if t.user_attrs["phase"] == "stage2"}
    assert all(t.user_attrs["stage"] == winner_stage for t in ts if t.user_attrs["phase"] == "stage2")
    assert stage2 | ({3, 5, 7} & {t.user_attrs["cut"] for t in ts if t.user_attrs["stage"] == winner_stage}) == {
        c for c in range(1, 8) if {1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 6: 3, 7: 3}[c] == winner_stage}
    for key in ("cut", "cut_name", "stage", "strategy", "seed", "params", "macs", "test_auroc",
                "node_id", "duration_s", "checkpoint"):
        assert key in ts[0].user_attrs, key
    # latency is not timed beside other trials: the quiet pass after the search times every model alone
    assert "latency_batch1_ms" not in ts[0].user_attrs
    from ttl_search.results import open_study, stored_latency

    latency = stored_latency(open_study("ref", reference["url"])[0])
    timed = {(r["strategy"], r["cut"]) for r in latency["rows"]}
    assert timed == {("ttl", t.user_attrs["cut"]) for t in ts} | {("ttl", 7)}  # every trained cut, and the full model
    for row in latency["rows"]:
        q1, q3 = row["batch1_iqr"]
        assert 0 < q1 <= row["batch1_ms"] <= q3 and latency["repeats"] >= 20
    assert best["latency_batch1_ms"] == next(r["batch1_ms"] for r in latency["rows"] if r["cut"] == best["cut"])
    assert best["latency_batch1_iqr"] is not None and best["latency_device"].startswith("CPU")
    assert ts[0].intermediate_values  # per-epoch validation curve for the dashboard
    from ttl_search.search.record import PREDICTIONS_ATTR, trial_predictions

    for t in ts:  # every trial stored what it predicted: any metric can be recomputed
        assert set(t.system_attrs[PREDICTIONS_ATTR]) == {"val", "test"}
        assert PREDICTIONS_ATTR not in t.user_attrs
        labels, probs = trial_predictions(t, "val")
        assert probs.shape == (78, 2)
        from ttl_search.train.metrics import auroc
        assert auroc(labels, probs) == pytest.approx(t.value, abs=1e-4)
    low, high = best["val_ci"]
    assert low <= best["val"]["auroc"] <= high
    assert best["cut"] in best["indistinguishable"] and best["reference_cut"] in best["indistinguishable"]
    assert best["rule"] == "smallest_within_ci"
    params = {r["cut"]: r["params"] for r in best["ranking"]}
    assert params[best["cut"]] == min(params[c] for c in best["indistinguishable"])


def test_status_best_compare_cli(reference):
    url = reference["url"]
    run = lambda *a: cli(*a, "--storage", url)  # noqa: E731 - in this process: seconds, not an interpreter each
    status = run("status", "ref")
    assert status.returncode == 0 and "COMPLETE" in status.stdout and "stage1" in status.stdout
    best = run("best", "ref")
    assert f"chosen cut {reference['best']['cut']}" in best.stdout
    assert "95% interval" in best.stdout and "vs best (paired)" in best.stdout
    assert "vs best (paired)" in status.stdout  # status ends with every cut's interval
    csv_out = run("compare", "ref", "--format", "csv")
    assert csv_out.stdout.splitlines()[0].startswith("study,strategy,cut")
    md = run("compare", "ref", "--format", "markdown")
    assert md.stdout.startswith("| study")
    missing = run("best", "nope")
    assert missing.returncode == 2 and "studies there: ref" in missing.stderr
    again = run("run", str(DEBUG_STUDY), "--set", "name=ref")
    assert again.returncode == 2 and "resume ref" in again.stderr
    assert "trial/s" not in again.stderr  # no empty progress bar before the error


def test_killed_driver_resumes_to_the_same_answer(reference, storage_url, tmp_path, shared_datasets_dir_module):
    log = tmp_path / "driver.log"
    data = shared_datasets_dir_module

    # 1. kill in stage 1: one stage-1 trial complete, others running. A debug trial takes about a
    # second, so the running one may complete in the moment between the look and the kill: then
    # the scenario was not reached, and a fresh study tries again (at most 3 times)
    for _ in range(3):
        name = f"kill-{uuid.uuid4().hex[:8]}"
        proc = start_driver(_study_args(name, storage_url, data), log)
        try:
            wait_for(lambda: any(t.state == TrialState.COMPLETE for t in trials(name, storage_url))
                     and any(t.state == TrialState.RUNNING for t in trials(name, storage_url)), proc,
                     what="stage 1 mid-way")
        finally:
            kill_group(proc)
        if any(t.state == TrialState.RUNNING for t in trials(name, storage_url)):
            break
    assert any(t.state == TrialState.RUNNING for t in trials(name, storage_url))
    status = cli("status", name, "--storage", storage_url)
    assert "ORPHANED: RUNNING trial(s)" in status.stdout and f"pid {proc.pid}" in status.stdout, status.stdout

    # 2. resume, and kill again while a stage-2 trial runs
    resume = ["resume", name, "--storage", storage_url, "--quiet"]
    proc = start_driver(resume, log)
    try:
        wait_for(lambda: any(t.state == TrialState.RUNNING and t.user_attrs.get("phase") == "stage2"
                             for t in trials(name, storage_url)), proc, what="a stage-2 trial running")
    finally:
        kill_group(proc)

    # 3. resume to the end
    assert run_cli(resume, log) == 0, log.read_text()[-3000:]
    ts = trials(name, storage_url)
    keys = complete_keys(ts)
    assert len(keys) == len(set(keys)), "a cut/seed was completed twice"
    assert not [t for t in ts if t.state == TrialState.RUNNING]
    failed = [t for t in ts if t.state == TrialState.FAIL]
    assert len(failed) >= 2 and all("driver that stopped" in t.user_attrs["fail_reason"] for t in failed)
    assert sorted(keys) == sorted(complete_keys(reference["trials"]))
    best = _best(name, storage_url, log)
    assert best["cut"] == reference["best"]["cut"]
    assert best["val"]["auroc"] == pytest.approx(reference["best"]["val"]["auroc"], abs=1e-9)
    assert best["test"]["auroc"] == pytest.approx(reference["best"]["test"]["auroc"], abs=1e-9)


def _trial_worker_pids(driver_pid: int) -> list[int]:
    import psutil

    out = []
    for p in psutil.Process(driver_pid).children(recursive=True):
        try:
            if "ImplicitFunc" in " ".join(p.cmdline()) or p.name().startswith("ray::ImplicitFunc"):
                out.append(p.pid)
        except psutil.Error:
            continue
    return out


def test_killed_worker_is_retried(tmp_path, shared_datasets_dir_module):
    name = "worker-kill"
    url = f"sqlite:///{tmp_path / 'w.db'}"
    log = tmp_path / "driver.log"
    proc = start_driver(_study_args(name, url, shared_datasets_dir_module, "--set", "trial.max_epochs=6",
                                    "--set", "concurrency=1"), log)
    try:
        wait_for(lambda: bool(_trial_worker_pids(proc.pid)) and
                 any(t.state == TrialState.RUNNING and t.intermediate_values for t in trials(name, url)),
                 proc, what="a trial in training")
        victims = _trial_worker_pids(proc.pid)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            kill_group(proc)
    ts = trials(name, url)
    failed = [t for t in ts if t.state == TrialState.FAIL]
    assert len(failed) == 1 and "worker failed" in failed[0].user_attrs["fail_reason"]
    retried = [t for t in ts if t.state == TrialState.COMPLETE and t.user_attrs["cut"] == failed[0].user_attrs["cut"]]
    assert len(retried) == 1
    assert not [t for t in ts if t.state == TrialState.RUNNING]


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5).read()
        return True
    except OSError:
        return False


def test_dashboard_serves_a_running_study(tmp_path, shared_datasets_dir_module):
    name = "dash"
    url = f"sqlite:///{tmp_path / 'dash.db'}"
    log = tmp_path / "driver.log"
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The dashboard first (it creates the schema), and answering, before the study starts: on a
    # loaded machine a late dashboard would otherwise miss the whole run.
    dash = start_driver(["dashboard", "--storage", url, "--port", str(port)], tmp_path / "dashboard.log")
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/api/studies"), dash, timeout=120, what="the dashboard")
    except BaseException:
        kill_group(dash)
        raise
    proc = start_driver(_study_args(name, url, shared_datasets_dir_module), log)
    seen_with_attrs = False
    try:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            try:
                studies = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5))
                ids = [s["study_id"] for s in studies["study_summaries"] if s["study_name"] == name]
                if ids:
                    detail = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{ids[0]}", timeout=5))
                    done = [t for t in detail["trials"] if t["state"] == "Complete"]
                    if done:
                        attrs = {a["key"] for a in done[0]["user_attrs"]}
                        seen_with_attrs = {"cut", "cut_name", "stage", "test_auroc", "params", "node_id"} <= attrs
            except OSError:
                pass
            time.sleep(0.5)
        assert proc.wait(timeout=60) == 0
    finally:
        kill_group(dash)
        if proc.poll() is None:
            kill_group(proc)
    text = log.read_text()
    assert "database is locked" not in text
    assert seen_with_attrs, "the dashboard never listed a completed trial with its user attributes"


def test_asha_stopped_trials_are_pruned(tmp_path, shared_datasets_dir_module):
    name = "asha"
    url = f"sqlite:///{tmp_path / 'asha.db'}"
    log = tmp_path / "driver.log"
    args = _study_args(name, url, shared_datasets_dir_module, "--set", "search.method=exhaustive",
                       "--set", "scheduler.type=asha", "--set", "scheduler.grace_period=1",
                       "--set", "scheduler.reduction_factor=2", "--set", "trial.max_epochs=4",
                       "--set", "trial.early_stopping=0", "--set", "concurrency=1")
    assert run_cli(args, log) == 0, log.read_text()[-3000:]
    ts = trials(name, url)
    pruned = [t for t in ts if t.state == TrialState.PRUNED]
    assert pruned, "ASHA stopped no trial"
    for t in pruned:
        assert t.user_attrs["epochs"] < 4 and t.user_attrs["stopped_by"] == "scheduler"
    for t in ts:
        if t.state == TrialState.COMPLETE:
            assert t.user_attrs["epochs"] == 4
    assert len(ts) == 7 and not [t for t in ts if t.state == TrialState.FAIL]


def test_gpus_on_a_cluster_without_any_fail_fast(tmp_path, shared_datasets_dir_module, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the driver's local Ray sees no GPU, also on a GPU host
    log = tmp_path / "driver.log"
    start = time.time()
    rc = run_cli(_study_args("gpu", f"sqlite:///{tmp_path / 'g.db'}", shared_datasets_dir_module,
                             "--set", "resources.gpus=0.5"), log, timeout=120)
    assert rc == 2
    assert "resources.gpus=0.5" in log.read_text() and "0 GPUs" in log.read_text()
    assert time.time() - start < 90


def test_first_run_reads_cleanly(tmp_path, shared_datasets_dir_module):
    """The README's main command as a new user runs it (no RAY_AUTH_MODE set, progress bar on):
    no Ray token notice, the bar counts both running trials, and the chosen cut is printed once."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env.update(RAY_USAGE_STATS_ENABLED="0", TTL_SEARCH_DATA=str(shared_datasets_dir_module))
    proc = subprocess.run([sys.executable, "-m", "ttl_search", "run", str(DEBUG_STUDY), "--set", "trial.max_epochs=3"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Token authentication" not in out
    assert "running=2" in proc.stderr  # concurrency 2: two trials at once, both counted
    assert "0trial [" not in proc.stderr  # the bar starts with its total, never empty
    assert proc.stdout.count("chosen cut") == 1
    assert (tmp_path / "ttl-search.db").is_file()


def test_full_baseline_reuses_ttl_at_the_last_cut_and_counts_show_trainable(study, capsys):
    """The debug study with baselines full and linear_probe: full fine-tuning is not trained again
    (TTL at cut 7 is the same model with the same seed), and every table shows trainable
    parameters next to the total."""
    from ttl_search.results import compare_studies, open_study
    from ttl_search.cli import main

    from ttl_search.storage import study_trials, trial_ref

    name, url = study
    main_study = open_study(name, url)[0]
    baselines = optuna.load_study(study_name=f"{name}:baselines", storage=url)
    # the search in the study, the baselines in its baselines study; both read as one
    assert main_study.user_attrs["baselines_study"] == baselines.study_name
    assert {t.user_attrs["strategy"] for t in main_study.trials} == {"ttl"}
    assert {t.user_attrs["strategy"] for t in baselines.trials} == {"full", "linear_probe"}
    ts = study_trials(main_study)
    assert [trial_ref(t) for t in ts] == [t.number for t in main_study.trials] + [
        f"baselines:{t.number}" for t in baselines.trials]
    full = [t for t in ts if t.user_attrs["strategy"] == "full"]
    ttl_last = [t for t in ts if t.user_attrs["strategy"] == "ttl" and t.user_attrs["cut"] == 7]
    assert len(full) == 1 and len(ttl_last) == 1 and full[0].state == TrialState.COMPLETE
    source = ttl_last[0]
    assert full[0].user_attrs["reused_from"] == source.number and full[0].value == source.value
    for key in ("val_auroc", "test_auroc", "params", "trainable_params", "checkpoint", "seed"):
        assert full[0].user_attrs[key] == source.user_attrs[key], key
    assert full[0].user_attrs["duration_s"] == 0.0
    from ttl_search.search.record import PREDICTIONS_ATTR
    assert full[0].system_attrs[PREDICTIONS_ATTR] == source.system_attrs[PREDICTIONS_ATTR]

    probe = next(t for t in ts if t.user_attrs["strategy"] == "linear_probe")
    total, trainable = probe.user_attrs["params"], probe.user_attrs["trainable_params"]
    assert trainable < total
    frame = compare_studies([name], url)
    row = frame[frame.strategy == "linear_probe"].iloc[0]
    assert (row.params, row.trainable_params) == (total, trainable)

    assert main(["status", name, "--storage", url]) == 0
    status = capsys.readouterr().out
    assert "trainable" in status and f"same model as trial {source.number}" in status
    assert main(["best", name, "--storage", url, "--format", "json"]) == 0
    best = json.loads(capsys.readouterr().out)
    assert "trainable_params" in best
    assert {r["strategy"]: r["trials"] for r in best["ranking"]}["linear_probe"] == [trial_ref(probe)]
    # the baselines study is read through its study; resuming it is refused with the reason
    for command in (["status", baselines.study_name], ["resume", baselines.study_name]):
        assert main([*command, "--storage", url]) == 2
        err = capsys.readouterr().err
        assert f"holds the baselines of study {name!r}" in err and err.count("\n") == 1, err


@pytest.mark.slow
@pytest.mark.integration
def test_cross_validated_study_decides_on_the_mean_over_folds(tmp_path, shared_datasets_dir_module):
    """selection.folds=2: every planned training runs on both folds of train+validation, each fold
    validates on its own half, and the answer averages the folds (the test split stays apart)."""
    url = f"sqlite:///{tmp_path / 'cv.db'}"
    rc = run_cli(_study_args("cv", url, shared_datasets_dir_module, "--set", "selection.folds=2",
                             "--set", "trial.max_epochs=1"), tmp_path / "driver.log")
    assert rc == 0, (tmp_path / "driver.log").read_text()[-3000:]
    from ttl_search.search.record import trial_predictions

    ts = trials("cv", url)
    assert all(t.state == TrialState.COMPLETE for t in ts)
    by_cut: dict[int, set[int]] = {}
    for t in ts:
        by_cut.setdefault(t.params["cut"], set()).add(t.params["fold"])
        assert t.user_attrs["fold"] == t.params["fold"]
        labels, _ = trial_predictions(t, "val")
        assert len(labels) == 312  # half of the 546 + 78 pooled images
        assert len(trial_predictions(t, "test")[0]) == 156
    assert all(folds == {0, 1} for folds in by_cut.values()) and {3, 5, 7} <= set(by_cut)
    val0 = {tuple(trial_predictions(t, "val")[0]) for t in ts if t.params["fold"] == 0}
    assert len(val0) == 1  # every cut validates on the same fold
    best = _best("cv", url, tmp_path / "driver.log")
    assert best["folds"] == 2 and best["repeats"] == 2  # two trainings (one per fold) behind the chosen cut
    mean = sum(t.value for t in ts if t.params["cut"] == best["cut"]) / 2
    assert best["val"]["auroc"] == pytest.approx(mean, abs=1e-9)
    low, high = best["val_ci"]
    assert low <= mean <= high


def _assert_onnx_averages(onnx_file: Path, name: str, url: str, members) -> None:
    """The exported ensemble's probabilities on the test split are its members' stored ones, averaged."""
    import numpy as np
    import onnxruntime as ort

    from ttl_search.data import make_loader
    from ttl_search.export import restore_trial
    from ttl_search.search.record import trial_predictions

    restored = restore_trial(name, url, members[0].number, pretrained=False)
    loader = make_loader(restored.data.test, restored.transform, train=False, batch_size=512, seed=0,
                         dims=restored.data.dims)
    x, _ = next(iter(loader))
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    probs = np.exp(session.run(None, {"input": x.numpy()})[0])
    mean = np.mean([trial_predictions(t, "test")[1] for t in members], axis=0)
    assert np.abs(probs - mean).max() < 1e-4


def test_an_ensemble_study_trains_the_chosen_cuts_other_seeds_last(tmp_path, shared_datasets_dir_module):
    """selection.ensemble=2: after the two-stage search, one more seed of the chosen cut; `best`
    reports the averaged probabilities' metrics, a resume trains nothing more."""
    import numpy as np

    from ttl_search.search.record import trial_predictions
    from ttl_search.train.metrics import metric_value

    url = f"sqlite:///{tmp_path / 'ens.db'}"
    args = _study_args("ens", url, shared_datasets_dir_module, "--set", "selection.ensemble=2",
                       "--set", "trial.max_epochs=1")
    assert run_cli(args, tmp_path / "driver.log") == 0, (tmp_path / "driver.log").read_text()[-3000:]
    ts = trials("ens", url)
    best = _best("ens", url, tmp_path / "driver.log")
    assert all(t.state == TrialState.COMPLETE for t in ts)
    assert [t.user_attrs["phase"] for t in ts].count("ensemble") == 1
    last = max(ts, key=lambda t: t.datetime_start)
    assert last.user_attrs["phase"] == "ensemble" and (last.params["cut"], last.params["repeat"]) == (best["cut"], 1)
    assert last.user_attrs["seed"] == 1  # search.seed 0 + repeat 1
    members = [t for t in ts if t.params["cut"] == best["cut"]]
    ens = best["ensemble"]
    assert ens["size"] == 2 and ens["complete"] and ens["seeds"] == [0, 1]
    assert sorted(ens["trials"]) == sorted(t.number for t in members) and best["repeats"] == 1
    for split in ("val", "test"):
        labels = trial_predictions(members[0], split)[0]
        mean = np.mean([trial_predictions(t, split)[1] for t in members], axis=0)
        assert ens[split] == pytest.approx(metric_value("auroc", labels, mean), abs=1e-9)
        assert ens[f"{split}_ci"][0] <= ens[split] <= ens[f"{split}_ci"][1]
    shown = cli("best", "ens", "--storage", url)
    assert shown.returncode == 0 and f"Answer: the ensemble of 2 seeds of cut {best['cut']}" in shown.stdout
    resumed = cli("resume", "ens", "--storage", url, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert len(trials("ens", url)) == len(ts)

    # `export` writes the answer: both members in one model whose softmax is their averaged probabilities
    from ttl_search.search.record import TrialRecord

    out = tmp_path / "export"
    shown = cli("export", "ens", "--storage", url, "--output", out)
    assert shown.returncode == 0 and "the ensemble of 2 models" in shown.stdout, shown.stderr
    card = json.loads((out / "model_card.json").read_text())
    assert [str(n) for n in card["trial"]] == [str(n) for n in sorted(ens["trials"])]
    assert card["model"]["ensemble"]["size"] == 2 and card["metrics"]["ensemble"]["test"] == ens["test"]
    assert card["verification"]["test_metric_recomputed"] == pytest.approx(ens["test"], abs=1e-4)
    assert card["cost"]["params"] == sum(TrialRecord.from_trial(t).params for t in members)
    assert "Ensemble of 2 models" in (out / "model_card.md").read_text()
    _assert_onnx_averages(out / "model.onnx", "ens", url, members)
    one = cli("export", "ens", "--storage", url, "--trial", members[0].number, "--output", tmp_path / "one")
    assert one.returncode == 0 and f"exported trial {members[0].number} of" in one.stdout, one.stderr
    report = cli("report", "ens", "--storage", url, "--output", tmp_path / "report")
    assert report.returncode == 0, report.stderr
    assert f"Answer: the ensemble of 2 seeds of cut {best['cut']}" in (tmp_path / "report" / "summary.md").read_text()


def test_a_cut_ensemble_study_answers_with_every_indistinguishable_cut(tmp_path, shared_datasets_dir_module):
    """selection.ensemble=indistinguishable: nothing beyond the search is trained; `best` reports the
    average of the indistinguishable cuts' models, and `export` writes them (different cuts) as one
    model whose probabilities are that average."""
    import numpy as np

    from ttl_search.search.record import trial_predictions
    from ttl_search.train.metrics import metric_value

    url = f"sqlite:///{tmp_path / 'cuts.db'}"
    args = _study_args("cuts", url, shared_datasets_dir_module, "--set", "selection.ensemble=indistinguishable",
                       "--set", "trial.max_epochs=1", "--set", "selection.budget.params=1e9")
    assert run_cli(args, tmp_path / "driver.log") == 0, (tmp_path / "driver.log").read_text()[-3000:]
    ts = trials("cuts", url)
    assert "ensemble" not in {t.user_attrs["phase"] for t in ts}
    best = _best("cuts", url, tmp_path / "driver.log")
    ens = best["ensemble"]
    # a budget far above every cut: no member is left out (the default cap, the full model's size, is
    # tested in tests/search/test_budget.py)
    assert ens["kind"] == "cuts" and ens["cuts"] == best["indistinguishable"] and len(ens["cuts"]) >= 2
    assert ens["left_out"] == [] and ens["cap"] == "params <= 1G"
    members = [t for t in ts if t.params["cut"] in ens["cuts"]]
    assert sorted(ens["trials"]) == sorted(t.number for t in members) and ens["complete"]
    for split in ("val", "test"):
        labels = trial_predictions(members[0], split)[0]
        mean = np.mean([trial_predictions(t, split)[1] for t in members], axis=0)
        assert ens[split] == pytest.approx(metric_value("auroc", labels, mean), abs=1e-9)
    shown = cli("best", "cuts", "--storage", url)
    assert shown.returncode == 0, shown.stderr
    assert f"Answer: the ensemble of the {len(ens['cuts'])} cuts indistinguishable from the best " \
           f"({', '.join(map(str, ens['cuts']))}; {len(members)} models" in shown.stdout
    table = cli("best", "cuts", "--storage", url, "--format", "csv")
    assert table.returncode == 0, table.stderr
    row = next(csv.DictReader(io.StringIO(table.stdout)))
    assert (int(row["ensemble_size"]), row["ensemble_cuts"]) == (len(members), " ".join(map(str, ens["cuts"])))
    assert float(row["ensemble_test"]) == pytest.approx(ens["test"])

    out = tmp_path / "export"
    shown = cli("export", "cuts", "--storage", url, "--output", out)
    assert shown.returncode == 0 and f"the ensemble of {len(members)} models" in shown.stdout, shown.stderr
    card = json.loads((out / "model_card.json").read_text())
    assert sorted(card["model"]["ensemble"]["cuts"]) == sorted(t.params["cut"] for t in members)
    assert card["model"]["cut"] == card["model"]["ensemble"]["cuts"][0] == best["cut"]  # the chosen cut first
    assert card["verification"]["test_metric_recomputed"] == pytest.approx(ens["test"], abs=1e-4)
    assert (out / "model_card.md").read_text().startswith(
        f"# Model card: test_cnn truncated at cuts {', '.join(map(str, ens['cuts']))} (an ensemble)")
    _assert_onnx_averages(out / "model.onnx", "cuts", url, members)


def test_two_runs_of_one_new_name_at_once(tmp_path, shared_datasets_dir_module):
    """Both drivers pass the "exists?" check at about the same moment; the one that loses the race
    to create the study says it already exists (no DuplicatedStudyError traceback), the other runs."""
    url = f"sqlite:///{tmp_path / 'race.db'}"
    args = _study_args("race", url, shared_datasets_dir_module, "--set", "trial.max_epochs=1")
    procs = [start_driver(args, tmp_path / f"driver{i}.log") for i in range(2)]
    try:
        codes = sorted(p.wait(timeout=600) for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                kill_group(p)
    logs = [(tmp_path / f"driver{i}.log").read_text() for i in range(2)]
    assert codes == [0, 2], logs
    loser = next(text for text in logs if "already exists" in text or "is being created by" in text)
    assert "Traceback" not in loser and "ttl-search resume race" in loser
    assert all(t.state == TrialState.COMPLETE for t in trials("race", url))


def test_a_study_that_learned_nothing_says_so(tmp_path, shared_datasets_dir_module):
    """lr 1e6: every cut's loss explodes and its validation AUROC sits at chance; `best` warns
    instead of presenting cut 1 as an answer."""
    url = f"sqlite:///{tmp_path / 'lr.db'}"
    log = tmp_path / "driver.log"
    assert run_cli(_study_args("lr", url, shared_datasets_dir_module, "--set", "trial.lr=1e6",
                                "--set", "trial.max_epochs=1"), log) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "WARNING: no trained cut is better than chance" in text
    assert "WARNING: the validation loss exploded" in text
    best = _best("lr", url, log)
    assert best["at_chance"] and best["chance"] == 0.5 and len(best["warnings"]) == 2


def test_one_driver_per_study_a_second_is_refused_and_force_takes_over(tmp_path, shared_datasets_dir_module):
    """`resume` while the driver lives is refused (nothing marked failed); `resume --force` takes
    the study over: the first driver stops without writing, and the new one marks the first's
    RUNNING trials failed (its own retraining of them is not waited for)."""
    url = f"sqlite:///{tmp_path / 'dup.db'}"
    first = start_driver(_study_args("dup", url, shared_datasets_dir_module, "--set", "trial.max_epochs=30",
                                     "--set", "driver.heartbeat_s=1", "--set", "driver.stale_after_s=30"),
                         tmp_path / "first.log")
    forced = None
    try:
        wait_for(lambda: any(t.state == TrialState.RUNNING and t.intermediate_values for t in trials("dup", url)),
                 first, what="a trial in training")
        refused = cli("resume", "dup", "--storage", url, "--quiet")
        assert refused.returncode == 2 and "is being run by the driver on" in refused.stderr, refused.stderr
        assert f"pid {first.pid}" in refused.stderr and "--force" in refused.stderr
        assert not [t for t in trials("dup", url) if t.state == TrialState.FAIL]
        status = cli("status", "dup", "--storage", url)
        assert f"pid {first.pid}), last heartbeat" in status.stdout and "(alive)" in status.stdout

        forced = start_driver(["resume", "dup", "--storage", url, "--quiet", "--force"], tmp_path / "forced.log")
        assert first.wait(timeout=300) == 2, (tmp_path / "first.log").read_text()[-3000:]
        taken = "left RUNNING by a driver that stopped (the driver on"
        wait_for(lambda: any(taken in t.user_attrs.get("fail_reason", "") and f"pid {first.pid})" in
                             t.user_attrs["fail_reason"] for t in trials("dup", url)), forced,
                 what="the new driver's reconciliation")
    finally:
        for proc in (first, forced):
            if proc is not None and proc.poll() is None:
                kill_group(proc)
    text = (tmp_path / "first.log").read_text()
    assert "was taken over by the driver on" in text and "UpdateFinishedTrialError" not in text
    keys = complete_keys(trials("dup", url))
    assert len(keys) == len(set(keys)), "a cut/seed was completed twice"


def test_a_database_outage_is_ridden_out(tmp_path, shared_datasets_dir_module):
    """PostgreSQL stopped (`pg_ctl stop -m fast`) for 10 s while trials train: the driver waits and
    says so, the trainings go on, and the study finishes with every cut once."""
    from pgserver import server_or_skip

    server = server_or_skip()
    log = tmp_path / "driver.log"
    try:
        proc = start_driver(_study_args("outage", server.url, shared_datasets_dir_module,
                                        "--set", "trial.max_epochs=8"), log)
        try:
            wait_for(lambda: any(t.state == TrialState.RUNNING and t.intermediate_values
                                 for t in trials("outage", server.url)), proc, what="a trial in training")
            server.stop()
            time.sleep(10)
            server.start()
            assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                kill_group(proc)
        text = log.read_text()
        assert "unreachable for" in text and "reachable again after" in text
        ts = trials("outage", server.url)
        keys = complete_keys(ts)
        assert len(keys) == len(set(keys)) and len(keys) >= 4
        assert not [t for t in ts if t.state != TrialState.COMPLETE]
    finally:
        server.close()


def test_reliability_benchmark_runs_studies_at_once_on_one_postgresql(tmp_path, shared_datasets_dir_module, capsys):
    """benchmarks/reliability.py, its concurrent case: three debug studies at once on one throw-away
    PostgreSQL, each ending with the uninterrupted run's trainings, none twice, no database error."""
    import csv
    import importlib.util

    from pgserver import server_or_skip
    from studyutil import REPO

    server_or_skip().close()  # the benchmark starts its own; skip (fail under CI) where it cannot
    spec = importlib.util.spec_from_file_location("reliability", REPO / "benchmarks" / "reliability.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.modules.pop(spec.name, None)
    out = tmp_path / "reliability.csv"
    assert bench.main(["--scenarios", "concurrent", "--concurrent", "3", "--epochs", "1", "--timeout", "400",
                       "--data", str(shared_datasets_dir_module), "--csv", str(out)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("failures: 0")
    rows = {r["scenario"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"reference", "concurrent x3"}
    both = rows["concurrent x3"]
    assert both["exit codes"] == "0 0 0" and both["result"] == "ok"
    assert int(both["planned"]) == 3 * int(rows["reference"]["planned"]) == int(both["completed"]) > 0
    assert both["lost"] == both["twice"] == both["db errors"] == both["hangs"] == "0"
