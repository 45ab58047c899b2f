"""What a fresh ``pip install -e .`` gives: every module imports, every third-party module the
package imports comes from a requirement it declares, and every ``--format`` of every command works.

A package installed on a machine by hand once made the suite pass there and fail on a clean one
(``compare --format markdown`` needs tabulate, which pandas only lists as optional); these tests
fail on such a gap wherever they run.
"""

from __future__ import annotations

import ast
import csv
import importlib
import io
import json
import pkgutil
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import ttl_search
from ttl_search.cli import build_parser, main

PACKAGE_DIR = Path(ttl_search.__file__).parent
EXTRA_MODULES = {"matplotlib": "report", "onnx": "export", "onnxruntime": "export", "onnxscript": "export",
                 "safetensors": "export",
                 "optuna_dashboard": "dashboard", "psycopg": "postgres"}
"""Modules that may come from an extra (named in README.md and setup.cfg) instead of the core
requirements; the code that imports them says which extra to install when they are missing."""
RUNTIME_ONLY = {"tabulate": "pandas DataFrame.to_markdown (compare --format markdown)"}
"""Packages the code never imports itself but calls through another library at run time."""


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> dict[str, set[str]]:
    """Declared requirement names by group: ``""`` for the core, else the extra's name."""
    groups: dict[str, set[str]] = {}
    for req in metadata.requires("ttl-search") or []:
        name = _normalise(re.split(r"[\s;\[<>=!~]", req, maxsplit=1)[0])
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", req)
        groups.setdefault(extra.group(1) if extra else "", set()).add(name)
    return groups


def _imported_modules() -> dict[str, set[str]]:
    """Top-level third-party modules imported anywhere in the package -> files importing them."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "ttl_search" and top != "__future__":
                    found.setdefault(top, set()).add(path.name)
    return found


def test_every_module_imports():
    # (``ttl_search.__main__`` runs the CLI when imported; its imports are the CLI's)
    names = [m.name for m in pkgutil.walk_packages([str(PACKAGE_DIR)], "ttl_search.") if m.name != "ttl_search.__main__"]
    assert len(names) > 10
    for name in names:
        importlib.import_module(name)


def test_every_import_comes_from_a_declared_requirement():
    groups = _declared()
    core = groups[""]
    distributions = metadata.packages_distributions()
    problems = []
    for module, files in sorted(_imported_modules().items()):
        dists = {_normalise(d) for d in distributions.get(module, [])}
        if not dists:
            problems.append(f"{module} (imported by {', '.join(sorted(files))}) is not installed by any requirement")
            continue
        allowed = core | groups.get(EXTRA_MODULES.get(module, ""), set())
        if not dists & allowed:
            problems.append(f"{module} (imported by {', '.join(sorted(files))}) comes from {', '.join(sorted(dists))}, "
                            f"which is not a declared {'core ' if module not in EXTRA_MODULES else ''}requirement")
    for package, why in RUNTIME_ONLY.items():
        if _normalise(package) not in core:
            problems.append(f"{package} is needed by {why} but is not a core requirement")
    assert not problems, "\n".join(problems)


def test_the_extras_the_readme_names_exist():
    readme = (PACKAGE_DIR.parent / "README.md").read_text()
    named = set(re.findall(r'pip install [^`\n]*?\.\[([a-z,]+)\]', readme))
    assert named, "README.md names no install command with extras"
    declared = _declared()
    for group in named:
        for extra in group.split(","):
            assert extra in declared, f"README.md installs the extra {extra!r}, which setup.cfg does not declare"


# ---------------------------------------------------------------------------------------------
# every --format of every command

def _format_commands() -> dict[str, tuple[str, ...]]:
    """Command -> the choices of its ``--format`` option, read from the parser itself."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    commands = {}
    for name, subparser in sub.choices.items():
        for action in subparser._actions:
            if "--format" in action.option_strings:
                commands[name] = tuple(action.choices)
    return commands


def _check_output(fmt: str, text: str) -> None:
    assert text.strip(), "no output"
    if fmt == "json":
        json.loads(text)
    elif fmt == "csv":
        rows = list(csv.reader(io.StringIO(text)))
        assert len(rows) >= 2 and len({len(r) for r in rows}) == 1
    elif fmt == "markdown":
        lines = text.strip().splitlines()
        assert lines[0].startswith("|") and set(lines[1]) <= set("|-: ")


@pytest.fixture(scope="module")
def command_args(study, tmp_path_factory) -> dict[str, list[str]]:
    from conftest import SHARED_DATASETS

    study_name, url = study
    out = tmp_path_factory.mktemp("formats")
    return {
        "backbones": [],
        "cutoffs": ["test_cnn", "--input-size", "32"],
        "train": ["--set", "backbone=test_cnn", "--set", "weights=none", "--set", "data.dataset=breastmnist",
                  "--set", f"data.root={SHARED_DATASETS}", "--set", "input_size=28", "--set", "max_epochs=1",
                  "--set", "data.train_fraction=0.2", "--set", "latency_repeats=1", "--quiet"],
        "status": [study_name, "--storage", url],
        "best": [study_name, "--storage", url],
        "compare": [study_name, "--storage", url],
        "svcca": [study_name, "--storage", url, "--samples", "20", "--spatial", "pool", "--output", str(out),
                  "--no-attach"],
        "probe": [str(Path(__file__).resolve().parents[1] / "studies" / "debug.yaml"), "--storage", f"sqlite:///{out / 'probe.db'}",
                  "--set", f"trial.data.root={SHARED_DATASETS}", "--quiet"],
    }


def test_every_format_of_every_command(command_args, capsys):
    commands = _format_commands()
    assert set(commands) <= set(command_args), f"add arguments for {set(commands) - set(command_args)} to this test"
    assert all(formats == ("table", "json", "csv", "markdown") for formats in commands.values()), commands
    for command, formats in commands.items():
        for fmt in formats:
            capsys.readouterr()
            assert main([command, *command_args[command], "--format", fmt]) == 0, (command, fmt)
            out = capsys.readouterr().out
            try:
                _check_output(fmt, out)
            except Exception as exc:  # noqa: BLE001 - say which command and format
                raise AssertionError(f"ttl-search {command} --format {fmt}: {exc}\n{out[:2000]}") from exc


READ_ONLY = """
import sys
from ttl_search.cli import main
name, url, out = sys.argv[1:4]
for argv in (["status", name], ["best", name], ["compare", name], ["report", name, "--output", out + "/r", "--no-attach"],
             ["svcca", name, "--samples", "20", "--spatial", "pool", "--output", out + "/s", "--no-attach"],
             ["export", name, "--output", out + "/e"]):
    assert main([*argv, "--storage", url]) == 0, argv
run_side = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.") or m in ("ttl_search.run.driver",
                  "ttl_search.run.cluster", "ttl_search.run.searcher"))
assert not run_side, run_side
"""


def test_reading_commands_never_import_the_run_side(study, tmp_path):
    """status, best, compare, report, svcca and export read a study without Ray: not imported, not
    started (a machine that only reaches the database can read it)."""
    name, url = study
    proc = subprocess.run([sys.executable, "-c", READ_ONLY, name, url, str(tmp_path)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


LAYERS = [("errors",), ("config",), ("models",), ("data",), ("train",), ("search",), ("storage", "lease"), ("results",),
          ("run",), ("analysis", "report", "export"), ("cli", "__main__", "__init__")]
"""The package's layers in the order data travels; a module imports only from its own layer or
those before it, and nothing but the CLI imports ``run`` (reading a study never needs Ray)."""


def _layer(module: str) -> int:
    top = module.split(".")[0]
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_imports_follow_the_data_flow():
    wrong = []
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = path.relative_to(PACKAGE_DIR).with_suffix("").parts
        package = parts[:-1] if parts[-1] == "__init__" else parts[:-1]
        here = ".".join(parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                base = list(package[: len(package) - (node.level - 1)])
                target = ".".join(base + ([node.module] if node.module else []))
                if target and _layer(target) > _layer(here):
                    wrong.append(f"{here} imports {target}, a later layer")
                if target.split(".")[0] == "run" and here.split(".")[0] not in ("run", "cli"):
                    wrong.append(f"{here} imports the run side ({target}); only the CLI's run/resume may")
    assert not wrong, "\n".join(wrong)
