"""Reading a study: the read-only view of the database."""

from __future__ import annotations


def test_reading_a_study_builds_no_model(study, tmp_path, monkeypatch, capsys):
    """The cut candidates are stored with the study: status, best, compare and report rank and
    plot stored results without a forward pass of the backbone."""
    import ttl_search.search.study as study_module
    from ttl_search.results import CANDIDATES_ATTR, open_study
    from ttl_search.cli import main

    name, url = study
    stored = open_study(name, url)[0].user_attrs[CANDIDATES_ATTR]
    assert [c["index"] for c in stored] == list(range(1, 8)) and {"name", "stage", "params"} <= set(stored[0])

    def no_forward_pass(*args, **kwargs):
        raise AssertionError("a reading command analysed the cuts with a forward pass")

    monkeypatch.setattr(study_module, "analyze_cuts", no_forward_pass)
    for argv in (["status", name], ["best", name], ["compare", name],
                 ["report", name, "--output", str(tmp_path), "--no-attach"]):
        assert main([*argv, "--storage", url]) == 0, argv
    capsys.readouterr()
