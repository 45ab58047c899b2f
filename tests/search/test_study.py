"""Study configs: every file in studies/ loads, overrides win, bad keys are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from ttl_search.errors import ConfigError, TTLSearchError
from ttl_search.search.samplers import TwoStageSampler
from ttl_search.config import to_dict
from ttl_search.search.study import cut_candidates, load_study_config, make_sampler, needs_probe

STUDIES = sorted((Path(__file__).resolve().parents[2] / "studies").glob("*.yaml"))


def test_there_are_studies():
    names = {p.name for p in STUDIES}
    assert {"debug.yaml", "demo.yaml", "resnet50_pneumonia.yaml", "adrenal3d.yaml"} <= names


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_study_file_loads_and_plans(path):
    cfg = load_study_config(path)
    probe = None
    if needs_probe(cfg):  # a guided search plans from the stored probe table: a stand-in for it
        probe = {"rows": [{"cut": c.index, "probe_val": c.index / 100, "knn_val": 0.5, "logme": 0.0,
                           "params": c.params} for c in cut_candidates(cfg)]}
    sampler = make_sampler(cfg, probe=probe)
    plan = sampler.plan([])
    assert plan.action == "run" and plan.job.strategy in ("ttl", *cfg.baselines)
    again = load_study_config(None, extra=to_dict(cfg))
    assert to_dict(again) == to_dict(cfg)


def test_demo_is_a_two_stage_search_of_pretrained_lite0():
    cfg = load_study_config(Path(STUDIES[0]).parent / "demo.yaml")
    assert cfg.trial.backbone == "efficientnet_lite0" and cfg.trial.weights == "imagenet"
    sampler = make_sampler(cfg)
    assert isinstance(sampler, TwoStageSampler)
    assert sorted(c.index for c in sampler.representatives.values()) == [2, 4, 6, 9, 12, 16, 18]


def test_overrides_beat_the_file():
    cfg = load_study_config(STUDIES[0].parent / "debug.yaml", ["trial.max_epochs=7", "search.repeats=3", "name=x"])
    assert cfg.trial.max_epochs == 7 and cfg.search.repeats == 3 and cfg.name == "x"
    assert cfg.trial.metric == cfg.metric


@pytest.mark.parametrize("override,message", [
    ("serch.repeats=2", "unknown config key 'serch'"),
    ("search.stratgy=tpe", "unknown config key 'search.stratgy'"),
    ("search.method=grid", "valid methods: two_stage, exhaustive, tpe, guided, none"),
    ("search.strategy=exhaustive", "'search.strategy' was renamed to 'search.method'"),
    ("trial.backbone=vgg16", "valid backbones"),
    ("baselines=[fine_tune]", "full, linear_probe, lwft, transfusion, scratch"),
    ("scheduler.type=hyperband", "fifo, asha"),
    ("metric=dice", "valid metrics"),
    ("concurrency=0", "concurrency"),
    ("trial.max_epochs=abc", "trial.max_epochs must be of type int"),
    ("baseline_cuts={full: 3}", "not among baselines"),
])
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(TTLSearchError, match=message):
        load_study_config(STUDIES[0].parent / "debug.yaml", [override])


def test_cut_too_deep_for_the_input_size():
    with pytest.raises(ConfigError, match="valid cuts"):
        make_sampler(load_study_config(None, ["trial.backbone=densenet121", "trial.input_size=28",
                                              "baselines=[full]"]))


def test_missing_study_file():
    with pytest.raises(ConfigError, match="not found"):
        load_study_config("studies/nope.yaml")


def test_a_stored_config_of_an_earlier_version_still_reads():
    """Studies created before the rename keep working: their stored ``search.strategy`` is read as
    ``search.method`` (only a user's own file gets the error)."""
    from ttl_search.config import from_dict, to_dict
    from ttl_search.search.study import StudyConfig, upgrade_stored_config

    stored = to_dict(load_study_config(STUDIES[0].parent / "debug.yaml", ["search.method=exhaustive"]))
    stored["search"]["strategy"] = stored["search"].pop("method")
    with pytest.raises(ConfigError, match="renamed to 'search.method'"):
        from_dict(StudyConfig, stored)
    assert from_dict(StudyConfig, upgrade_stored_config(stored)).search.method == "exhaustive"


def test_numbers_in_exponent_form_are_floats(tmp_path):
    """YAML 1.1 reads 1e-3 as a string; users mean a number, in --set and in study files."""
    cfg = load_study_config(STUDIES[0].parent / "debug.yaml", ["trial.lr=1e-3", "trial.weight_decay=5E-4"])
    assert cfg.trial.lr == 0.001 and cfg.trial.weight_decay == 0.0005
    path = tmp_path / "s.yaml"
    path.write_text("trial:\n  lr: 3e-4\n  max_epochs: 2\nname: '1e3'\n")
    cfg = load_study_config(path)
    assert cfg.trial.lr == 0.0003 and cfg.name == "1e3"  # quoted stays a string
    with pytest.raises(ConfigError, match="lr must be a positive number"):
        load_study_config(path, ["trial.lr=-1e-3"])


def test_a_binary_study_file_is_named(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    with pytest.raises(ConfigError, match=r"study.yaml is not a text \(UTF-8\) YAML file"):
        load_study_config(path)
