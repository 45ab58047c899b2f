"""optuna-dashboard for ttl-search studies: the answer stored where the dashboard shows it, every
study's own artifact folder served, and no deletions unless asked for (a real dashboard server)."""

from __future__ import annotations

import json
import re
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from pgserver import free_port

optuna_dashboard = pytest.importorskip("optuna_dashboard")


@pytest.fixture
def copied(study, tmp_path):
    """A copy of the session's finished debug study and its baselines study (full and linear-probe) in a fresh
    database whose artifact folder is the default one beside it, checkpoints included."""
    from ttl_search.results import artifacts_dir, open_study

    name, url = study
    source, cfg = open_study(name, url)
    target = f"sqlite:///{tmp_path / 'copy.db'}"
    for copied_name in (name, f"{name}:baselines"):
        optuna.copy_study(from_study_name=copied_name, from_storage=url, to_storage=target)
    store = artifacts_dir(cfg, url) / "store"
    shutil.copytree(store, tmp_path / "ttl-artifacts" / "store")
    return name, target


def test_the_answer_is_stored_where_the_dashboard_shows_it(copied):
    from optuna_dashboard import get_note

    from ttl_search.results import best_cut, open_study
    from ttl_search.results.dashboard import publish_answer

    name, url = copied
    study, cfg = open_study(name, url)
    best = publish_answer(study, cfg)
    assert best == best_cut(name, url) | {"finished": best["finished"]}
    study, _ = open_study(name, url)
    assert study.metric_names == ["val_auroc"]
    attrs = study.user_attrs
    assert (attrs["chosen_trial"], attrs["chosen_cut"], attrs["chosen_rule"]) == (best["trial"], best["cut"],
                                                                                   "smallest_within_ci")
    assert attrs["chosen_val_ci"] == best["val_ci"] and attrs["chosen_cut_name"] == best["cut_name"]
    note = get_note(study)
    assert f"## Chosen: cut {best['cut']} ({best['cut_name']}), trial {best['trial']}" in note
    assert "| full fine-tuning | 7 |" in note and "| linear probe | 7 |" in note
    plain = max((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: (t.value, -t.number))
    says_plain = f"Optuna's \"Best Trial\" is trial {plain.number}" in note
    assert says_plain == (plain.number != best["trial"])  # said exactly when the dashboard's crown is another trial
    trials = {t.number: t for t in study.trials}
    notes = {n: _trial_note(study, t) for n, t in trials.items()}
    assert notes[best["trial"]].startswith(f"TTL cut {best['cut']} ({best['cut_name']}), stage ")
    assert notes[best["trial"]].endswith(", CHOSEN")
    assert sum(n.endswith("CHOSEN") for n in notes.values()) == 1
    assert "val AUROC" in notes[best["trial"]] and "[" in notes[best["trial"]]  # the cut's interval
    # the study holds the search alone: no baseline, no parameter that never varies; its note says where they are
    assert all(n.startswith("TTL cut") for n in notes.values())
    assert all(set(t.params) == {"cut"} for t in study.trials)
    assert f"The baselines (and the frozen probe's model) are in study `{name}:baselines`" in note
    baselines = optuna.load_study(study_name=f"{name}:baselines", storage=url)
    assert baselines.user_attrs["baselines_of"] == name and baselines.metric_names == ["val_auroc"]
    side = [_trial_note(baselines, t) for t in baselines.trials]
    assert sorted(n.split(" cut ")[0] for n in side) == ["full fine-tuning", "linear probe"]
    full = next(n for n in side if n.startswith("full"))  # a copy of TTL at the last cut, which the note names
    assert re.search(rf", same model as trial \d+ of study {name}", full), full
    assert all(set(t.params) == {"strategy"} for t in baselines.trials)  # both at the last cut
    assert get_note(baselines).startswith(f"# Baselines of study `{name}`")
    assert f"## Chosen: cut {best['cut']}" in get_note(baselines)
    assert [r["trials"] for r in best["ranking"] if r["strategy"] == "full"] == [["baselines:0"]] or \
        [r["trials"] for r in best["ranking"] if r["strategy"] == "full"] == [["baselines:1"]]
    # publishing again changes nothing (no new note versions)
    before = dict(study._storage.get_study_system_attrs(study._study_id))
    publish_answer(study, cfg)
    assert dict(study._storage.get_study_system_attrs(study._study_id)) == before


def _trial_note(study: optuna.Study, trial) -> str:
    from optuna_dashboard._note import get_note_from_system_attrs

    return get_note_from_system_attrs(study._storage.get_study_system_attrs(study._study_id),
                                      trial._trial_id)["body"]


@pytest.fixture
def served(copied, tmp_path):
    """A real dashboard server (read-only) on the copied study plus a second study whose artifacts
    live in a folder of its own."""
    from wsgiref.simple_server import make_server

    from ttl_search.results import open_study
    from ttl_search.results.dashboard import dashboard_app
    from ttl_search.storage import attach_artifact

    name, url = copied
    study, cfg = open_study(name, url)
    port = free_port()
    server = make_server("127.0.0.1", port, dashboard_app(url))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # a second study, created with its own `artifacts:` folder (after the dashboard started), with one file
    other_dir = tmp_path / "elsewhere"
    cfg.name, cfg.artifacts = "second", str(other_dir)
    other = optuna.create_study(study_name="second", storage=url)
    from ttl_search.config import to_dict
    from ttl_search.results import CONFIG_ATTR

    other.set_user_attr(CONFIG_ATTR, to_dict(cfg))
    trial = other.ask()
    payload = tmp_path / "weights.bin"
    payload.write_bytes(b"second study's checkpoint")
    other_id = attach_artifact(other_dir, trial, payload, "application/octet-stream")
    other.tell(trial, 0.5)
    yield {"base": f"http://127.0.0.1:{port}", "study": study, "other": other, "other_id": other_id,
           "trial": trial}
    server.shutdown()
    server.server_close()


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def test_every_study_serves_its_own_artifacts_and_nothing_can_be_deleted(served):
    from ttl_search.search.record import TrialRecord

    base, study = served["base"], served["study"]
    trial = next(t for t in study.trials if TrialRecord.from_trial(t).checkpoint_artifact_id)
    artifact = TrialRecord.from_trial(trial).checkpoint_artifact_id
    body = _get(f"{base}/artifacts/{study._study_id}/{trial._trial_id}/{artifact}")
    assert body == Path(TrialRecord.from_trial(trial).checkpoint).read_bytes()
    other, other_id = served["other"], served["other_id"]
    other_trial = other.trials[0]
    assert _get(f"{base}/artifacts/{other._study_id}/{other_trial._trial_id}/{other_id}") == \
        b"second study's checkpoint"
    studies = json.loads(_get(f"{base}/api/studies"))
    assert {s["study_name"] for s in studies["study_summaries"]} == {study.study_name, f"{study.study_name}:baselines",
                                                                     "second"}
    request = urllib.request.Request(f"{base}/api/artifacts/{study._study_id}/{trial._trial_id}/{artifact}",
                                     method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 403 and b"--allow-deletions" in refused.value.read()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(f"{base}/api/studies/{study._study_id}", method="DELETE"),
                               timeout=30)
    assert refused.value.code == 403
    assert _get(f"{base}/artifacts/{study._study_id}/{trial._trial_id}/{artifact}") == body  # still there


def test_deletions_pass_when_allowed(tmp_path):
    from ttl_search.results.dashboard import read_only

    def app(environ, start_response):
        start_response("204 No Content", [])
        return [b""]

    seen = []
    for allow in (False, True):
        read_only(app, allow)({"REQUEST_METHOD": "DELETE"}, lambda status, headers: seen.append(status))
    assert seen == ["403 Forbidden", "204 No Content"]
