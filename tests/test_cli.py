"""The command line as a user runs it: a real `ttl-search` process."""

from __future__ import annotations

import json
import subprocess
import sys


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ttl_search", *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"ttl-search {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_help_lists_commands():
    out = run_cli("--help").stdout
    assert "cutoffs" in out and "backbones" in out


def test_cutoffs_resnet50_json():
    rows = json.loads(run_cli("cutoffs", "resnet50", "--format", "json").stdout)
    assert len(rows) == 17
    assert {"index", "name", "stage", "channels", "params", "macs", "valid"} <= set(rows[0])
    assert rows[11]["params"] == 6310978


def test_cutoffs_table_and_csv():
    table = run_cli("cutoffs", "test_cnn", "--input-size", "32", "--classes", "3", "--in-channels", "1").stdout
    assert "layer3.1" in table and "7 cuts at 32 px" in table
    csv_text = run_cli("cutoffs", "densenet121", "--input-size", "28", "--format", "csv").stdout
    lines = csv_text.strip().splitlines()
    assert lines[0].startswith("index,name,stage") and len(lines) == 9
    assert "False" in lines[-1] and "earlier unit" in lines[-1]


def test_cutoffs_of_any_timm_or_torchvision_model():
    rows = json.loads(run_cli("cutoffs", "timm:convnext_atto", "--input-size", "64", "--format", "json").stdout)
    assert len(rows) == 16 and rows[0]["name"] == "stem" and all(r["valid"] for r in rows)
    assert [r["index"] for r in rows if r["stage_end"]] == [3, 6, 13, 16]
    table = run_cli("cutoffs", "torchvision:mobilenet_v3_small", "--input-size", "32").stdout
    assert "features.12 *" in table and "13 cuts at 32 px" in table and "cuts read off its graph at 224 px" in table
    proc = run_cli("cutoffs", "timm:convnext_atoo", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "close names: convnext_atto" in proc.stderr


def test_backbones_listing():
    rows = json.loads(run_cli("backbones", "--format", "json").stdout)
    names = {r["name"] for r in rows}
    assert {"resnet50", "efficientnet_lite0", "r3d_18", "test_cnn"} <= names


def test_unknown_backbone_is_a_one_line_error():
    proc = run_cli("cutoffs", "vgg16", check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert "unknown backbone 'vgg16'" in proc.stderr and "resnet50" in proc.stderr
