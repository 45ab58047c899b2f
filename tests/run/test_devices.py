"""A trial runs on exactly what Ray assigned it: the decision (pure), the worker's side (the
``CUDA_VISIBLE_DEVICES`` it leaves), the settings a study refuses, and Ray started with fake GPUs
(``num_gpus=2`` on a machine without any): tasks and a whole study whose trials ask for none run
on the CPU with every GPU hidden, and a trial that runs out of memory is stored as failed, once."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from ttl_search.errors import ConfigError
from ttl_search.run.devices import (VISIBLE_ENV, DeviceAssignment, assigned_device, check_device_settings,
                                    claim_device, local_device)
from ttl_search.search.study import load_study_config

from studyutil import DEBUG_STUDY

TESTS = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the decision


@pytest.mark.parametrize("requested,gpu_ids,visible,device", [
    ("auto", [], "0,1", "cpu"),          # Ray >= 2.4x leaves the node's variable: still the CPU
    ("auto", [], None, "cpu"),
    ("cpu", [], "", "cpu"),
    ("auto", ["1"], "1", "cuda:0"),      # Ray set the variable to the GPU it assigned
    ("cuda", ["3"], "2,3", "cuda:1"),
    ("auto", ["1"], None, "cuda:1"),     # Ray told not to set it: the node's numbering
    ("cpu", ["0"], "0", "cpu"),
])
def test_the_device_is_what_ray_assigned(requested, gpu_ids, visible, device):
    assert assigned_device(requested, gpu_ids, visible) == device


def test_an_assignment_the_trial_cannot_use_is_refused_with_the_valid_values():
    with pytest.raises(ConfigError, match="Ray assigned this trial no GPU.*auto, cpu"):
        assigned_device("cuda", [], "0,1")
    with pytest.raises(ConfigError, match="valid devices: auto, cuda"):
        assigned_device("cuda:1", ["0"], "0")
    with pytest.raises(ConfigError, match="the node's GPU setup and Ray's disagree"):
        assigned_device("auto", ["2"], "0,1")


def test_a_worker_given_no_gpu_hides_every_gpu(monkeypatch):
    monkeypatch.setenv(VISIBLE_ENV, "0,1")  # the node's, as Ray leaves it for a worker with no GPU
    claimed = claim_device("auto", [])
    assert claimed == DeviceAssignment("cpu", (), "") and os.environ[VISIBLE_ENV] == ""
    assert claimed.describe() == "cpu (Ray assigned no GPU; every GPU hidden)"
    monkeypatch.setenv(VISIBLE_ENV, "1")
    claimed = claim_device("auto", [1])
    assert claimed == DeviceAssignment("cuda:0", ("1",), "1") and os.environ[VISIBLE_ENV] == "1"
    assert claimed.describe() == "cuda:0 (Ray GPU 1)" and claimed.to_dict()["gpu_ids"] == ["1"]


# --------------------------------------------------------------------------- what a study refuses


def _cfg(*overrides: str):
    return load_study_config(DEBUG_STUDY, ["storage=sqlite:///unused.db", *overrides])


@pytest.mark.parametrize("overrides,message", [
    (["resources.gpus=2"], "resources.gpus=2, but a trial trains on one device; valid values: 0 .*, a fraction .* or 1"),
    (["resources.gpus=1", "trial.device=cuda:1"], "Ray assigns each trial its GPU; valid devices .*: auto, cuda"),
    (["trial.device=cuda"], "resources.gpus is 0.*; valid devices with resources.gpus=0: auto, cpu"),
    (["resources.gpus=0.5", "trial.device=cpu"], "would reserve GPUs the trials never use.*: auto, cuda"),
])
def test_settings_no_trial_can_honour_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_device_settings(_cfg(*overrides))


def test_settings_a_trial_honours_pass_and_local_phases_run_where_the_trials_do():
    for overrides in ([], ["trial.device=cpu"], ["resources.gpus=0.5"], ["resources.gpus=1", "trial.device=cuda"]):
        check_device_settings(_cfg(*overrides))
    assert local_device(_cfg()) == "cpu"  # trials on the CPU: the driver's latency pass too
    assert local_device(_cfg("resources.gpus=1")) == "auto"


def test_a_study_with_settings_no_trial_can_honour_is_refused_before_ray_starts(tmp_path, breastmnist):
    from ttl_search.run.driver import run_study
    from ttl_search.storage import open_storage, study_names

    cfg = load_study_config(DEBUG_STUDY, [f"storage=sqlite:///{tmp_path / 's.db'}",
                                          f"trial.data.root={breastmnist.parent}", "resources.gpus=4"])
    with pytest.raises(ConfigError, match="a trial trains on one device"):
        run_study(cfg)
    assert study_names(open_storage(cfg.storage)) == []


# --------------------------------------------------------------------------- on Ray, with fake GPUs


@pytest.fixture
def fake_gpu_ray(monkeypatch):
    """A local Ray that believes this node has two GPUs, on a node whose ``CUDA_VISIBLE_DEVICES``
    names both (as a GPU node's does); its workers know the out-of-memory test backbone."""
    import ray

    from faults import register_oom_backbone

    if ray.is_initialized():
        pytest.skip("Ray is already initialized in this process")
    monkeypatch.setenv(VISIBLE_ENV, "0,1")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    register_oom_backbone()  # the driver analyses its cuts too
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS / "run")])},
                          "worker_process_setup_hook": "faults.register_oom_backbone"})
    try:
        yield ray
    finally:
        from ttl_search.run.cluster import RAY_LOCAL, shutdown_ray

        shutdown_ray(RAY_LOCAL)


def _claim(requested: str) -> tuple[dict, str | None, bool]:
    import torch

    from ttl_search.run.devices import claim_ray_device

    claimed = claim_ray_device(requested)
    return claimed.to_dict(), os.environ.get(VISIBLE_ENV), torch.cuda.is_available()


@pytest.mark.integration
@pytest.mark.slow
def test_on_ray_with_gpus_a_trial_without_one_runs_on_the_cpu_with_every_gpu_hidden(fake_gpu_ray, tmp_path,
                                                                                   shared_datasets_dir, caplog):
    ray = fake_gpu_ray
    claim = ray.remote(_claim)
    none = ray.get(claim.options(num_cpus=1, num_gpus=0).remote("auto"))
    assert none == ({"device": "cpu", "gpu_ids": [], "visible": ""}, "", False)
    ones = ray.get([claim.options(num_cpus=1, num_gpus=1).remote("auto") for _ in range(2)])
    assert sorted(a["gpu_ids"][0] for a, _, _ in ones) == ["0", "1"]  # one GPU each
    for assignment, visible, _ in ones:
        assert assignment["device"] == "cuda:0" and visible == assignment["gpu_ids"][0]

    # A whole study (resources.gpus 0) on that cluster: every trial on the CPU, with its device
    # stored and logged; stage 3 (cuts 6-7) runs out of memory: failed once, not retried.
    from optuna.trial import TrialState

    from faults import OOM_BACKBONE
    from ttl_search.run.driver import run_study

    from studyutil import trials

    url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = load_study_config(DEBUG_STUDY, [f"storage={url}", f"trial.data.root={shared_datasets_dir}", "name=fake-gpus",
                                          f"trial.backbone={OOM_BACKBONE}", "trial.max_epochs=1",
                                          "trial.latency_repeats=0", "search.max_retries=2"])
    with caplog.at_level(logging.INFO, logger="ttl_search.run.searcher"):
        run_study(cfg)
    ts = trials("fake-gpus", url)
    failed = [t for t in ts if t.state == TrialState.FAIL]
    assert [t.params["cut"] for t in failed] == [7]  # once: not retried
    assert "out of memory on CPU" in failed[0].user_attrs["fail_reason"]
    assert "batch_size 64" in failed[0].user_attrs["fail_reason"] and failed[0].user_attrs["retry"] is False
    done = [t for t in ts if t.state == TrialState.COMPLETE]
    assert {t.params["cut"] for t in done} >= {3, 5}
    for t in failed + done:
        assert t.user_attrs["device"] == "cpu"
        assert t.user_attrs["device_assignment"] == {"device": "cpu", "gpu_ids": [], "visible": ""}
    logged = [r.getMessage() for r in caplog.records]
    assert sum("on cpu (CPU" in m and "Ray assigned no GPU)" in m for m in logged) == len(failed + done), logged


def test_gpu_check_skips_every_check_without_cuda():
    """benchmarks/gpu_check.py on a machine without CUDA: one line per check, each skipped with the
    reason, exit status 0 (on a GPU host it is the script to run by hand, not a test)."""
    import subprocess
    import sys
    from pathlib import Path

    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available: run benchmarks/gpu_check.py by hand (it trains on the GPU)")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) >= 8 and all(": skipped, no CUDA device" in line for line in lines), proc.stdout
    assert {line.split(":")[0] for line in lines} >= {"lite0", "resnet50", "augmentation", "shared-gpu", "no-gpu-trial",
                                                      "out-of-memory", "latency", "throughput"}
