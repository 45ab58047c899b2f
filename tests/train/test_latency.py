"""The quiet latency pass: every model timed alone, with a median and an interquartile range."""

from __future__ import annotations

import pytest

from ttl_search.data import DataConfig
from ttl_search.models.cost import median_iqr
from ttl_search.train.latency import measure_models
from ttl_search.train.trial import TrialConfig


def test_median_and_interquartile_range():
    assert median_iqr([4.0, 1.0, 3.0, 2.0, 5.0]) == (3.0, (2.0, 4.0))
    assert median_iqr([7.0]) == (7.0, None)  # one pass has no spread


def test_every_model_is_timed_with_its_spread(breastmnist):
    cfg = TrialConfig(backbone="test_cnn", weights=None, input_size=28, threads=1, device="cpu",  # also on a GPU host
                      data=DataConfig("breastmnist", path=str(breastmnist)))
    done = []
    table = measure_models(cfg, [("ttl", 3), ("ttl", 7), ("linear_probe", 7)], repeats=12,
                           progress=lambda i, n: done.append((i, n)))
    assert done == [(1, 3), (2, 3), (3, 3)]
    assert [(r["strategy"], r["cut"]) for r in table["rows"]] == [("ttl", 3), ("ttl", 7), ("linear_probe", 7)]
    assert table["repeats"] == 12 and table["threads"] == 1 and table["device"] == "cpu"
    assert table["device_name"].startswith("CPU") and "1 thread(s)" in table["device_name"]
    for row in table["rows"]:
        q1, q3 = row["batch1_iqr"]
        assert 0 < q1 <= row["batch1_ms"] <= q3
        assert row["batch64_ms"] > 0 and row["batch64_iqr"][0] <= row["batch64_ms"] <= row["batch64_iqr"][1]
    with pytest.raises(Exception, match="cut 99"):
        measure_models(cfg, [("ttl", 99)], repeats=2)
