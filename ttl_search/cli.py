"""The ``ttl-search`` command line: a thin layer over the library's typed functions.

The library logs; the CLI prints. Every :class:`~ttl_search.errors.TTLSearchError` becomes one
line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from .errors import TTLSearchError
from .search.record import ensemble_line, fmt_count, fmt_diff, fmt_interval, fmt_params

Handler = Callable[[argparse.Namespace], int]


def print_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a table with rich (plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    Console(width=max(120, len(columns) * 14)).print(table)


FORMATS = ("table", "json", "csv", "markdown")
"""Output formats of every command that prints data."""


def _flat(value: object) -> object:
    """A cell of a CSV or Markdown table: lists joined by spaces."""
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def write_rows(rows: list[dict], fmt: str, stream=None) -> None:
    """Write dict rows as JSON (a list of objects), CSV or a Markdown table."""
    stream = stream or sys.stdout
    if fmt == "json":
        json.dump(rows, stream, indent=2, default=str)
        stream.write("\n")
        return
    flat = [{k: _flat(v) for k, v in row.items()} for row in rows]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(flat[0]) if flat else [])
        writer.writeheader()
        writer.writerows(flat)
        stream.write(buffer.getvalue())
    elif fmt == "markdown":
        import pandas as pd

        stream.write(pd.DataFrame(flat).to_markdown(index=False, floatfmt=".4f") + "\n")


def frame_rows(frame) -> list[dict]:
    """A DataFrame as dict rows for :func:`write_rows` (None where a cell is missing)."""
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def _format_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=FORMATS, default="table",
                   help="table (for people, the default), json, csv or markdown")


def _int_or_none(value) -> int | None:
    """A count from a DataFrame cell (NaN where a trial has none)."""
    return None if value is None or value != value else int(value)


# ---------------------------------------------------------------------------------------------
# backbones / cutoffs


def cmd_backbones(args: argparse.Namespace) -> int:
    from .models.backbones import get_backbone, backbone_names, stage_ends

    rows = []
    for name in backbone_names():
        spec = get_backbone(name)
        rows.append({
            "name": spec.name,
            "dims": spec.dims,
            "cuts": len(spec.cuts),
            "stage_ends": stage_ends(spec),
            "default_input_size": spec.default_input_size,
            "weights": ["none"] + spec.weight_names,
            "description": spec.description,
        })
    if args.format == "table":
        print_table("registered backbones", ["name", "dims", "cuts", "stage ends", "input", "weights", "description"],
                    [[r["name"], f"{r['dims']}D", r["cuts"], ",".join(map(str, r["stage_ends"])),
                      r["default_input_size"], ", ".join(r["weights"]), r["description"]] for r in rows])
        print("any other CNN: timm:<model>, torchvision:<model> (2D or video 3D) or module:<package.module>:<factory>; "
              "its cuts come from its graph (`ttl-search cutoffs timm:resnet26d`), or by hand with "
              "`?cuts=<module>,<module>,...`")
    else:
        write_rows(rows, args.format)
    return 0


def cmd_cutoffs(args: argparse.Namespace) -> int:
    from .models.backbones import get_backbone
    from .models.truncation import analyze_cuts

    spec = get_backbone(args.backbone)
    size = args.input_size or spec.default_input_size
    rows = [r.as_dict() for r in analyze_cuts(spec.name, size, args.classes, args.in_channels, args.head)]
    if args.measure_latency:
        _measure_cutoffs(args, spec.name, size, rows)
    if args.format == "table":
        title = (f"{spec.name}: {len(rows)} cuts at {size} px, {args.in_channels} channel(s), "
                 f"{args.classes} classes, {args.head} head")
        print_table(
            title,
            ["cut", "name", "stage", "channels", "spatial", "params", "MACs",
             *(["latency b1 (ms)", "latency b64 (ms)"] if args.measure_latency else []), "valid"],
            [[r["index"], r["name"] + (" *" if r["stage_end"] else ""), r["stage"], r["channels"],
              "x".join(map(str, r["spatial"])) if r["spatial"] else "-", fmt_count(r["params"]),
              fmt_count(r["macs"]),
              *([_ms_cell(r, 1), _ms_cell(r, 64)] if args.measure_latency else []),
              "yes" if r["valid"] else f"no: {r['reason']}"] for r in rows],
        )
        print("* ends a stage (trained in stage 1 of the two-stage search)")
        graph = spec.analysis
        if graph is not None:
            how = ("given by hand, checked against its forward" if graph.hand else "read off its graph")
            print(f"cuts {how} at {graph.input_size} px in {graph.seconds:.2f} s; stages change where the spatial "
                  "resolution drops")
        if args.measure_latency and rows:
            print(f"latency: median [interquartile range] of {rows[0]['latency_repeats']} timed passes at batch 1 "
                  f"on {rows[0]['latency_device']}; `--format json > FILE` writes the table a study names in "
                  "selection.budget.latency_table")
    else:
        if args.format != "json":
            for r in rows:
                r["spatial"] = "x".join(map(str, r["spatial"])) if r["spatial"] else ""
        write_rows(rows, args.format)
    return 0


# ---------------------------------------------------------------------------------------------
# train


def _metric_rows(result: dict) -> list[list[object]]:
    names = list(result.get("val") or result.get("test") or [])
    return [[name, f"{result['val'].get(name, float('nan')):.4f}" if result.get("val") else "-",
             f"{result['test'].get(name, float('nan')):.4f}" if result.get("test") else "-"] for name in names]


def print_trial_summary(result: dict) -> None:
    """A person-readable summary of one trial result (a ``TrialResult.to_dict()``)."""
    title = (f"{result['backbone']} {result['strategy']} cut {result['cut']} ({result['cut_name']}, stage "
             f"{result['stage']}): {result['status']}{' - ' + result['reason'] if result['reason'] else ''}")
    if result.get("val"):
        print_table(title, ["metric", "validation", "test"], _metric_rows(result))
    else:
        print(title)
    full = result.get("full") or {}
    lat, full_lat = result.get("latency_ms") or {}, full.get("latency_ms") or {}
    print_table("cost (truncated vs full model)", ["", "truncated", "full"], [
        ["parameters", fmt_count(result["params"]), fmt_count(full.get("params"))],
        ["MACs", fmt_count(result["macs"]), fmt_count(full.get("macs"))],
        ["latency batch 1 (ms)", lat.get("batch1", "-"), full_lat.get("batch1", "-")],
        ["latency batch 64 (ms)", lat.get("batch64", "-"), full_lat.get("batch64", "-")],
    ])
    print(f"epochs {result['epochs']} (best {result['best_epoch']}), training {result['train_time_s']:.1f} s "
          f"on {result['device']}, input {result['input_size']} px x {result['in_channels']} channel(s)")


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .config import load_config, to_dict
    from .train.trial import TrialConfig, run_trial

    cfg = load_config(TrialConfig, args.config, args.set)
    bar = tqdm(total=cfg.max_epochs, desc="epochs", unit="epoch", disable=args.quiet)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        bar.update(1)
        bar.set_postfix({f"val_{cfg.metric}": f"{metrics[cfg.metric]:.4f}", "val_loss": f"{metrics['loss']:.4f}"})

    try:
        result = run_trial(cfg, on_epoch=on_epoch).to_dict()
    finally:
        bar.close()
    result["config"] = to_dict(cfg)
    if args.format == "table":
        print_trial_summary(result)
    elif args.format == "json":
        print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2, default=str))
    else:
        write_rows([{"metric": name, "validation": result["val"].get(name), "test": result["test"].get(name)}
                    for name in result.get("val") or {}], args.format)
    if args.output:
        from pathlib import Path

        Path(args.output).write_text(json.dumps(result, indent=2))
        print(f"result written to {args.output}", file=sys.stderr if args.format != "table" else sys.stdout)
    return 0 if result["status"] == "complete" else 1


def _measure_cutoffs(args: argparse.Namespace, backbone: str, size: int, rows: list[dict]) -> None:
    """Time every valid cut of ``rows`` here (random weights, one cut at a time, at batch 1 and 64)
    and add the latency columns, with what a study needs to check the table is its own."""
    from .train.cut_latency import measure_cut_latency

    cuts = [r["index"] for r in rows if r["valid"]]
    with count_bar("timing cuts", "cut", disable=args.format != "table") as progress:
        table = measure_cut_latency(backbone, size, cuts, args.in_channels, args.head, batches=(1, 64),
                                    repeats=args.latency_repeats, device=args.device, threads=args.threads,
                                    num_classes=args.classes, amp=args.amp, progress=progress)
    timed = {r["cut"]: r for r in table["rows"]}
    for r in rows:
        t = timed.get(r["index"], {})
        r.update(backbone=backbone, input_size=size, in_channels=args.in_channels,
                 latency_batch1_ms=t.get("batch1_ms"), latency_batch1_iqr=t.get("batch1_iqr"),
                 latency_batch64_ms=t.get("batch64_ms"), latency_batch64_iqr=t.get("batch64_iqr"),
                 latency_device=table["device_name"], latency_threads=table["threads"], latency_repeats=table["repeats"])


def _ms_cell(row: dict, batch: int) -> str:
    ms, iqr = row.get(f"latency_batch{batch}_ms"), row.get(f"latency_batch{batch}_iqr")
    if ms is None:
        return "-"
    return f"{ms:.3f}" + (f" [{iqr[0]:.3f}, {iqr[1]:.3f}]" if iqr else "")


# ---------------------------------------------------------------------------------------------
# studies


class StudyProgress:
    """A progress bar fed by the runner's progress events; drawn from the first event on, so a
    study that fails before its first trial prints no empty bar."""

    def __init__(self, disable: bool = False) -> None:
        self.disable = disable
        self.bar = None
        self.phase = ""
        self.notice: str | None = None

    def __call__(self, event: dict) -> None:
        plan = event.get("plan")
        if self.bar is None:
            from tqdm import tqdm

            total = plan.expected_total if plan is not None and plan.expected_total else None
            self.bar = tqdm(total=total, desc="trials", unit="trial", disable=self.disable)
        if plan is not None:
            self.phase = plan.phase
            if plan.expected_total:
                self.bar.total = plan.expected_total
        if "notice" in event:  # the database is unreachable (a line), or back (None)
            self.notice = event["notice"]
            if self.disable and self.notice:
                print(self.notice, file=sys.stderr, flush=True)
        self.bar.n = event["complete"] + event["failed"] + event["pruned"]
        postfix = {"phase": self.phase, "running": event["running"], "failed": event["failed"]}
        if self.notice:
            postfix["WAITING"] = self.notice
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _storage_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", default=None,
                   help="study database URL (default: $TTL_SEARCH_STORAGE or sqlite:///ttl-search.db)")


def _execution_args(p: argparse.ArgumentParser, set_help: str) -> None:
    """Options shared by the commands that drive a study (run, resume)."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    _storage_arg(p)
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: $RAY_ADDRESS or a local Ray)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def print_ranking(best: dict) -> None:
    """Every candidate model (fine-tuned cuts, frozen probes, baselines): validation mean with its
    interval, the paired difference to the best eligible candidate, and why the rule may not choose
    it (a guard, chance, the majority class)."""
    level = f"{best['confidence']:.0%}"
    rows = []
    for r in best["ranking"]:
        mark = "chosen" if r["chosen"] else ("same" if r["indistinguishable"] and not r.get("excluded") else "")
        mark += " (chance)" if r["at_chance"] else ""
        mark += " (excluded)" if r.get("excluded") else ""
        mean = "-" if r["mean_val"] is None else f"{r['mean_val']:.4f}"
        rows.append([r["strategy"], r["cut"], r["cut_name"] or "-", fmt_params(r["params"], r["trainable_params"]),
                     r["repeats"], mean, fmt_interval(r["val_ci"]), fmt_diff(r["diff"], r["diff_ci"]), mark])
    print_table(f"validation {best['metric']} of every candidate ({level} bootstrap intervals; 'same': "
                f"indistinguishable from the best eligible model, {best['reference']})",
                ["strategy", "cut", "name", "params", "seeds", "mean", "interval", "vs best (paired)", ""], rows)
    same = {(r["strategy"], r["cut"]) for r in best["ranking"] if r["indistinguishable"]}
    excluded = [e for e in best.get("excluded") or [] if (e["strategy"], e["cut"]) in same
                and not e["why"].startswith("over budget")]  # those: in the budget's lines
    if excluded:  # those the guards kept out though their main metric matched the best's
        guards = ", ".join(best.get("guards") or []) or "none"
        others = len(best["excluded"]) - len(excluded)
        print(f"not eligible though indistinguishable on validation {best['metric']} (guards: {guards}; models "
              f"that learned nothing are not eligible either){f'; {others} more in --format json' if others else ''}:")
        for e in excluded:
            print(f"  {e['model']}: {e['why']}")


def print_budget(best: dict) -> None:
    """The budget the answer was chosen within: each cut's cost (the latency measured before
    training included) and whether it fits, and for a budget asked about afterwards the study's own
    answer with the paired difference to it."""
    budget = best.get("budget")
    if not budget:
        return
    latency = any(c["latency_ms"] is not None for c in budget["cuts"])
    rows = [[c["cut"], c["name"], fmt_count(c["params"]), f"{c['model_mb']:.2f}", fmt_count(c["macs"]),
             *([("-" if c["latency_ms"] is None else f"{c['latency_ms']:.3f}")] if latency else []),
             c["over_budget"] or "fits"] for c in budget["cuts"]]
    batch = [f"latency b{budget['latency_batch']} (ms)"] if latency else []
    print_table(f"budget {budget['limits']}: the cuts a search may train", ["cut", "name", "params", "MB", "MACs",
                                                                          *batch, "budget"], rows)
    others = [o for o in budget["over_budget"] if o["strategy"] != "ttl"]
    if others:
        print("candidates over budget: " + "; ".join(f"{o['model']} ({o['why'].removeprefix('over budget: ')})"
                                                     for o in others))
    free = budget.get("unconstrained")
    if free:
        same = "" if free["indistinguishable"] is None else (
            ", indistinguishable" if free["indistinguishable"] else ", significantly different")
        val = "-" if free["val"] is None else f"{free['val']:.4f}"
        print(f"within budget {budget['limits']}: {best['model']}; without it the study's answer is {free['model']} "
              f"(validation {best['metric']} {val}): paired difference {fmt_diff(free['diff'], free['diff_ci'])}"
              f"{same}")


def _budget_cells(best: dict) -> dict[str, Any]:
    """The budget's columns of ``best --format csv/markdown``; none without a budget."""
    budget = best.get("budget")
    if not budget:
        return {}
    free = budget.get("unconstrained") or {}
    return {"budget": budget["limits"], "over_budget_cuts": " ".join(str(o["cut"]) for o in budget["over_budget"]
                                                                    if o["strategy"] == "ttl"),
            "unconstrained": free.get("model"), "diff_to_unconstrained": free.get("diff"),
            "diff_to_unconstrained_ci_low": (free.get("diff_ci") or [None, None])[0],
            "diff_to_unconstrained_ci_high": (free.get("diff_ci") or [None, None])[1]}


def _ensemble_cells(best: dict, metric: str) -> dict[str, Any]:
    """The ensemble's columns of ``best --format csv/markdown`` (the models it averages, its cuts;
    its values on the study's metric row); none without an ensemble."""
    ens = best.get("ensemble")
    if not ens:
        return {}
    main = metric == best["metric"]
    models = len(ens["trials"]) if ens["kind"] == "cuts" else ens["size"]
    return {"ensemble_size": models, "ensemble_cuts": " ".join(map(str, ens["cuts"])),
            "ensemble_validation": ens["val"] if main else None, "ensemble_test": ens["test"] if main else None}


def _print_best(name: str, storage: str | None, fmt: str = "table", best: dict | None = None) -> None:
    from .results import best_cut

    best = best_cut(name, storage) if best is None else best
    if fmt == "json":
        print(json.dumps(best, indent=2, default=str))
        return
    if fmt in ("csv", "markdown"):
        write_rows([{"study": name, "strategy": best["strategy"], "cut": best["cut"], "cut_name": best["cut_name"],
                     "rule": best["rule"],
                     "metric": metric, "validation": best["val"].get(metric),
                     "validation_sd": best["val_sd"].get(metric),
                     "validation_ci_low": (best["val_ci"] or [None, None])[0] if metric == best["metric"] else None,
                     "validation_ci_high": (best["val_ci"] or [None, None])[1] if metric == best["metric"] else None,
                     "test": best["test"].get(metric), "test_sd": best["test_sd"].get(metric),
                     "repeats": best["repeats"], "params": best["params"],
                     "trainable_params": best.get("trainable_params"),
                     **_ensemble_cells(best, metric), **_budget_cells(best)} for metric in best["val"]], fmt)
        return
    state = "finished" if best["finished"] else "not finished yet"
    print(f"study {name} ({state}): chosen {best['model']} ({best['cut_name']}, stage {best['stage']}) of "
          f"{best['backbone']}, {fmt_params(best['params'], best.get('trainable_params'))} parameters "
          f"(full: {fmt_count(best['full']['params'])}), {fmt_count(best['macs'])} MACs")
    metric = best["metric"]
    if best["val_ci"]:
        same = ", ".join(best["close"])
        pool = "every candidate" if best.get("candidates", "all") == "all" else "the fine-tuned cuts"
        rule = (f"the smallest of {pool} indistinguishable from the best" if best["rule"] == "smallest_within_ci"
                else f"the best mean of {pool}")
        print(f"rule {best['rule']} ({rule}): validation {metric} {best['val'].get(metric):.4f}, "
              f"{best['confidence']:.0%} interval {fmt_interval(best['val_ci'])}; indistinguishable from the best, "
              f"{best['reference']}: {same}")
    elif best["note"]:
        print(best["note"])
    if line := ensemble_line(best, metric):
        print(line)
    for warning in best["warnings"]:
        print(f"WARNING: {warning}")
    rows = []
    for m in best["val"]:
        cells = []
        for split in ("val", "test"):
            mean, sd = best[split].get(m), best[f"{split}_sd"].get(m)
            cells.append("-" if mean is None else f"{mean:.4f}" + (f" ± {sd:.4f}" if best["repeats"] > 1 else ""))
        rows.append([m, *cells])
    print_table(f"{best['model']}: mean over {best['repeats']} seed(s)", ["metric", "validation", "test"], rows)
    print_ranking(best)
    print_budget(best)
    for r in best["ranking"]:
        if r["strategy"] != "probe" or (str(r["trials"][0]).startswith("probe:") and not r["chosen"]):
            continue
        same = " (indistinguishable from the best)" if r["indistinguishable"] else ""
        ref = str(r["trials"][0])
        export = ("the study's driver stores it as a model when the study finishes" if ref.startswith("probe:")
                  else f"export it with `ttl-search export {name} --trial {ref} --output DIR`")
        print(f"frozen probe at cut {r['cut']} ({r['cut_name']}): validation {metric} {r['mean_val']:.4f} "
              f"{fmt_interval(r['val_ci'])}{same}, {fmt_params(r['params'], r['trainable_params'])} parameters, "
              f"no fine-tuning; {export}")


def _print_outcome(name: str, storage: str | None) -> int:
    """After a run: the best cut (the baselines' table for a baselines-only study), or why there
    is none (exit 1)."""
    from .results import open_study
    from .errors import StudyError

    _, cfg = open_study(name, storage)
    if cfg.search.method == "none":
        return cmd_compare(argparse.Namespace(names=[name], storage=storage, format="table"))
    try:
        _print_best(name, storage)
    except StudyError as exc:
        print(f"study {name} ended without a completed search trial ({exc}); see `ttl-search status {name}`")
        return 1
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .run.driver import run_study
    from .search.study import load_study_config

    extra = {k: v for k, v in (("storage", args.storage), ("ray_address", args.ray_address)) if v}
    cfg = load_study_config(args.study, args.set, extra)
    print(f"study {cfg.name}: {cfg.search.method} search of {cfg.trial.backbone} on {cfg.trial.data.dataset}")
    progress = StudyProgress(disable=args.quiet)
    try:
        run_study(cfg, progress)
    finally:
        progress.close()
    return _print_outcome(cfg.name, cfg.storage)


def cmd_resume(args: argparse.Namespace) -> int:
    from .run.driver import resume_study
    from .config import parse_overrides

    execution = parse_overrides(args.set)
    if args.ray_address:
        execution["ray_address"] = args.ray_address
    progress = StudyProgress(disable=args.quiet)
    try:
        resume_study(args.name, args.storage, execution, progress, force=args.force)
    finally:
        progress.close()
    return _print_outcome(args.name, args.storage)


PROBE_COLUMNS = ("cut", "name", "stage", "params", "channels", "probe_val", "probe_val_ci", "indistinguishable",
                 "knn_val", "logme", "probe_test", "c", "seconds")
"""Fields of a probe row as ``ttl-search probe`` writes them (JSON, CSV, Markdown)."""


def print_probe(table: dict, metric: str, fine_tuned: dict[int, float] | None = None, confidence: float = 0.95) -> None:
    """The frozen probe's table (see :func:`~ttl_search.results.probe_cells`)."""
    from .results import probe_cells

    columns, rows = probe_cells(table, metric, fine_tuned, confidence)
    print_table(f"frozen probe of {table['backbone']} at {table['input_size']} px on {table['device']}: features "
                f"{table['feature_seconds']:.1f}s, all {table['seconds']:.1f}s ('same': indistinguishable from the "
                f"best probe)", columns, rows)


@contextmanager
def count_bar(desc: str, unit: str, disable: bool = False) -> Iterator[Callable[[int, int], None]]:
    """A progress callback ``(done, total)`` drawing a tqdm bar, opened at the first call and
    closed when the block ends."""
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=desc, unit=unit, disable=disable)
        bar.n = done
        bar.refresh()

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()


def cmd_probe(args: argparse.Namespace) -> int:
    from .run.driver import probe_study
    from .search.study import load_study_config

    cfg = load_study_config(args.study, args.set, {"storage": args.storage} if args.storage else None)
    with count_bar("probing cuts", "cut", disable=args.quiet or args.format != "table") as progress:
        study, table, computed = probe_study(cfg, progress)
    if args.format != "table":
        write_rows([{k: r.get(k) for k in PROBE_COLUMNS} for r in table["rows"]], args.format)
        return 0
    stored = "computed and stored in" if computed else "stored earlier in"
    print(f"probe {stored} study {study.study_name}: best probe at cut {table['best_cut']}")
    print_probe(table, table["metric"], confidence=cfg.selection.confidence)
    return 0


def _print_status(name: str, storage: str | None, fmt: str = "table") -> tuple[int, bool]:
    from .results import chosen_cut, open_study, stored_probe, study_sampler, trial_rows
    from .storage import study_trials

    study, cfg = open_study(name, storage)
    frame = trial_rows(study, cfg.metric)
    trials = study_trials(study)
    plan = study_sampler(study, cfg).plan(trials)
    metric = cfg.metric
    if fmt != "table":
        records = frame_rows(frame)
        write_rows(records, fmt)
        running = sum(1 for r in records if r["state"] == "RUNNING")
        done = sum(1 for r in records if r["state"] in ("COMPLETE", "PRUNED"))
        return done, plan.action == "finished" and running == 0
    rows = []
    for r in frame.to_dict("records"):
        fmt = lambda v: "-" if v is None or v != v else f"{v:.4f}"  # noqa: E731
        rows.append([r["trial"], r["strategy"], r["cut"], r["cut_name"], r["stage"], r["phase"], r["state"],
                     fmt(r[f"val_{metric}"]), fmt(r[f"test_{metric}"]), fmt_count(_int_or_none(r["params"])),
                     fmt_count(_int_or_none(r["trainable_params"])),
                     "-" if r["duration_s"] is None else f"{r['duration_s']:.1f}s", r["note"]])
    print_table(f"study {name}: {cfg.search.method} search of {cfg.trial.backbone}; phase {plan.phase or '-'}, "
                f"{plan.action}", ["trial", "strategy", "cut", "name", "stage", "phase", "state", f"val {metric}",
                                   f"test {metric}", "params", "trainable", "duration", "note"], rows)
    done = sum(1 for r in rows if r[6] in ("COMPLETE", "PRUNED"))
    running = sum(1 for r in rows if r[6] == "RUNNING")
    failed = sum(1 for r in rows if r[6] == "FAIL")
    finished = plan.action == "finished" and running == 0
    total = max(plan.expected_total, done)
    width = 30
    filled = width if finished else int(width * done / total) if total else 0
    print(f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} trainings done, {running} running, "
          f"{failed} failed attempt(s){' - finished' if finished else ''}")
    line = driver_line(study, cfg, [r[0] for r in rows if r[6] == "RUNNING"])
    if line:
        print(line)
    best = chosen_cut(study, cfg, trials)
    probe = stored_probe(study)
    if probe is not None:
        tuned = {r["cut"]: r["mean_val"] for r in (best or {}).get("ranking", []) if r["strategy"] == "ttl"}
        print_probe(probe, metric, tuned, cfg.selection.confidence)
    if best is not None:
        print_ranking(best)
        print_budget(best)
        if line := ensemble_line(best, metric):
            print(line)
    return done, finished


def driver_line(study, cfg, running: list[int]) -> str:
    """Who drives the study, and whether its RUNNING trials are orphaned (their driver stopped)."""
    from .lease import read_lease
    from .storage import study_engine

    lease = read_lease(study_engine(study), study.study_name)
    trials = ", ".join(str(n) for n in running)
    if lease is not None and lease.alive(cfg.driver.stale_after_s):
        return f"driver: {lease.describe()} (alive)"
    if not running:
        return f"driver: none ({lease.describe()}, stopped without finishing)" if lease else ""
    who = f"{lease.describe()}, stopped" if lease else "their driver stopped"
    return (f"ORPHANED: RUNNING trial(s) {trials} belong to a driver that stopped heartbeating ({who}); "
            f"`ttl-search resume {study.study_name}` retrains them")


def cmd_status(args: argparse.Namespace) -> int:
    import time

    done, finished = _print_status(args.name, args.storage, args.format)
    while args.watch and not finished:
        time.sleep(args.interval)
        done, finished = _print_status(args.name, args.storage, args.format)
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    from .results import open_study, required_cut
    from .results.dashboard import publish_answer
    from .search.budget import parse_budget

    study, cfg = open_study(args.name, args.storage)
    if args.budget:  # a question about the finished study, not its answer: nothing is published
        best = required_cut(study, cfg, parse_budget(args.budget))
        _print_best(args.name, args.storage, args.format, best)
        return 0
    best = required_cut(study, cfg)
    _print_best(args.name, args.storage, args.format, best)
    try:  # a database that refuses writes (a read-only user) only loses the dashboard's copy
        publish_answer(study, cfg, best)
    except Exception as exc:  # noqa: BLE001 - the answer was printed; the dashboard's copy is extra
        logging.getLogger(__name__).warning("the answer is not stored for the dashboard: %s", exc)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .results import compare_studies

    frame = compare_studies(args.names, args.storage)
    if args.format != "table":
        write_rows(frame_rows(frame), args.format)
    else:
        rows = []
        cols = ["study", "strategy", "cut", "cut_name", "chosen", "repeats", "val_auroc", "interval", "vs best",
                "test_auroc", "test_auprc", "test_accuracy", "params", "trainable_params", "macs", "latency_batch1_ms"]
        for r in frame.to_dict("records"):
            r["interval"] = fmt_interval([r["val_ci_low"], r["val_ci_high"]])
            r["vs best"] = fmt_diff(r["diff_to_best"], [r["diff_ci_low"], r["diff_ci_high"]])
            r["vs best"] += " same" if r["indistinguishable"] is True and not r["chosen"] else ""
            rows.append(r)
        def cell(c, v):
            if v is None or (isinstance(v, float) and v != v):
                return "-"
            if c in ("params", "trainable_params", "macs"):
                return fmt_count(int(v))
            return f"{v:.4f}" if isinstance(v, float) else v
        print_table("comparison (means over seeds; interval and paired difference to each study's best cut on "
                    "its selection metric)", cols, [[cell(c, r.get(c)) for c in cols] for r in rows])
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from .results.dashboard import serve_dashboard
    from .storage import mask_url, storage_url

    url = storage_url(args.storage)
    mode = "deletions allowed" if args.allow_deletions else "read-only: nothing can be deleted"
    print(f"optuna-dashboard on http://{args.host}:{args.port} for {mask_url(url)}, {mode} (Ctrl-C stops it)",
          flush=True)
    serve_dashboard(url, args.host, args.port, args.artifacts, args.allow_deletions)
    return 0


def cmd_svcca(args: argparse.Namespace) -> int:
    from .analysis import SVCCAOptions, run_svcca

    opts = SVCCAOptions(samples=args.samples, split=args.split, spatial=args.spatial,
                        positions_per_image=args.positions_per_image, keep=args.keep, baseline=args.baseline,
                        seed=args.seed)
    run = run_svcca(args.name, args.storage, args.trial, opts, args.output, attach=not args.no_attach)
    c = run.context
    if args.format != "table":
        write_rows(frame_rows(run.units), args.format)
        for path in run.files.values():
            print(f"wrote {path}", file=sys.stderr)
        return 0
    print_table(f"trial {c['trial']} ({c['strategy']}, cut {c['cut']} {c['cut_name']}): pretrained vs fine-tuned on "
                f"{c['images']} {c['split']} images; {c['spatial_note']}",
                ["unit", "name", "stage", "SVCCA", "CKA", f"baseline SVCCA ({opts.baseline})", "baseline CKA", "samples"],
                [[r.unit, r.unit_name, r.stage, f"{r.svcca:.4f}", f"{r.cka:.4f}", f"{r.baseline_svcca:.4f}",
                  f"{r.baseline_cka:.4f}", r.samples] for r in run.units.itertuples()])
    for path in run.files.values():
        print(f"wrote {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import make_report

    if args.measure_latency:
        from .results import open_study
        from .run.latency import latency_phase

        study, cfg = open_study(args.name, args.storage)
        print(f"timing every trained model of {args.name}, one at a time", flush=True)
        with count_bar("timing models", "model") as progress:
            table = latency_phase(study, cfg, remote=False, progress=progress, again=True)
        if table is None:
            print("no latency measured: the study has no completed trial, or trial.latency_repeats is 0")
        else:
            print(f"timed {len(table['rows'])} models in {table['seconds']:.1f} s on {table['device_name']}")
    report = make_report(args.name, args.storage, args.output, attach=not args.no_attach)
    for path in report.files.values():
        print(f"wrote {path}")
    if report.artifact_ids:
        print(f"attached {len(report.artifact_ids)} file(s) to study {args.name} (optuna-dashboard lists them)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_trial

    result = export_trial(args.name, args.storage, args.trial, args.output, args.opset)
    card, v = result.card, result.card["verification"]
    what = (f"the ensemble of {len(card['trial'])} models (trials {', '.join(map(str, card['trial']))})"
            if card["model"].get("ensemble") else f"trial {card['trial']}")
    print(f"exported {what} of study {args.name}: {card['model']['backbone']} cut {card['model']['cut']} "
          f"({card['model']['cut_name']}), {fmt_count(card['cost']['params'])} parameters")
    print(f"checked on {v['samples']} test images: max |probability difference| TorchScript "
          f"{v['torchscript_max_abs_diff']:.2e}, ONNX {v['onnx_max_abs_diff']:.2e}")
    for path in result.files.values():
        print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ttl-search",
        description="Find how much of a pretrained CNN a medical image classifier should keep (TruncatedTL).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("backbones", help="list the registered backbones")
    _format_arg(p)
    p.set_defaults(handler=cmd_backbones)

    p = sub.add_parser("cutoffs", help="list the cut points of a backbone with size, MACs and validity")
    p.add_argument("backbone", help="a registered backbone (see `ttl-search backbones`), or timm:<model>, "
                                    "torchvision:<model> or module:<package.module>:<factory>")
    p.add_argument("--input-size", type=int, default=None, help="input side in pixels (default: the backbone's)")
    p.add_argument("--classes", type=int, default=2, help="classes of the new head (default 2)")
    p.add_argument("--in-channels", type=int, default=3, help="input channels (default 3)")
    p.add_argument("--head", choices=("pool", "flatten"), default="pool", help="new head (default pool)")
    p.add_argument("--measure-latency", action="store_true",
                   help="time every valid cut here (batch 1 and 64, random weights): run it on the machine the model "
                        "will be deployed on, `--format json > FILE`, and name FILE in selection.budget.latency_table")
    p.add_argument("--latency-repeats", type=int, default=20, help="timed passes at batch 1 (default 20)")
    p.add_argument("--device", default="cpu", help="device to time on: cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--amp", action="store_true",
                   help="time in mixed precision on CUDA, as trials with trial.amp (the default) evaluate")
    _format_arg(p)
    p.set_defaults(handler=cmd_cutoffs)

    p = sub.add_parser("train", help="run one trial (truncate, fine-tune, evaluate) outside any study")
    p.add_argument("--config", help="YAML file of trial settings (keys of TrialConfig; data under `data:`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set cut=5 --set data.train_fraction=0.1 (repeatable)")
    p.add_argument("--output", help="write the JSON result here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _format_arg(p)
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("run", help="start a study from a YAML file and run it to the end")
    p.add_argument("study", help="study YAML (see studies/)")
    _execution_args(p, "override a setting, e.g. --set trial.max_epochs=3 --set concurrency=2 (repeatable)")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("probe", help="score every cut with a frozen probe (one forward pass) and store it in the study")
    p.add_argument("study", help="study YAML (see studies/); the study is created when it does not exist")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study setting (repeatable), e.g. --set probe.knn_k=20")
    _storage_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _format_arg(p)
    p.set_defaults(handler=cmd_probe)

    p = sub.add_parser("resume", help="continue a study after a crash or interruption")
    p.add_argument("name", help="study name")
    _execution_args(p, "change how it runs: concurrency, resources.*, scheduler.*, artifacts, trial.data.root ...")
    p.add_argument("--force", action="store_true",
                   help="take the study over from a driver whose heartbeat is still fresh (only when you know it "
                        "is dead: two live drivers would train the same cuts twice)")
    p.set_defaults(handler=cmd_resume)

    p = sub.add_parser("status", help="table of a study's trials")
    p.add_argument("name")
    _storage_arg(p)
    p.add_argument("--watch", action="store_true", help="refresh until the study is finished")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes with --watch")
    _format_arg(p)
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("best", help="the chosen cut with its metrics and size")
    p.add_argument("name")
    _storage_arg(p)
    p.add_argument("--budget", action="append", default=[], metavar="KEY=VALUE",
                   help="the best model within this deployment budget, from the stored trials (nothing is "
                        "trained); keys: params, macs, latency_ms, latency_batch, model_mb (repeatable)")
    _format_arg(p)
    p.set_defaults(handler=cmd_best)

    p = sub.add_parser("compare", help="studies and strategies side by side")
    p.add_argument("names", nargs="+", help="study names")
    _storage_arg(p)
    _format_arg(p)
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser("dashboard", help="serve optuna-dashboard on the study database")
    _storage_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--artifacts", default=None,
                   help="an extra artifact folder (every study's own folder is served: its `artifacts:` setting, "
                        "or ttl-artifacts beside a SQLite database)")
    p.add_argument("--allow-deletions", action="store_true",
                   help="let the dashboard delete studies, trials' artifacts and notes (default: read-only)")
    p.set_defaults(handler=cmd_dashboard)

    p = sub.add_parser("svcca", help="SVCCA and CKA: pretrained vs fine-tuned units, unit vs unit, random baseline")
    p.add_argument("name", help="study name")
    _storage_arg(p)
    p.add_argument("--trial", default=None, help="trial number, or baselines:N for a trial of the baselines study "
                   "(default: the chosen cut's best trial)")
    p.add_argument("--samples", type=int, default=500, help="held-out images to use (default 500, at most the split)")
    p.add_argument("--split", choices=("test", "val"), default="test", help="held-out split (default test)")
    p.add_argument("--spatial", choices=("positions", "subsample", "pool"), default="subsample",
                   help="conv maps as samples: every spatial position, a random subsample of positions per image "
                        "(default), or global average pooling")
    p.add_argument("--positions-per-image", type=int, default=16, help="subsample: positions per image (default 16)")
    p.add_argument("--keep", type=float, default=0.99, help="variance the SVD step keeps (default 0.99)")
    p.add_argument("--baseline", choices=("shuffled", "gaussian"), default="shuffled",
                   help="random-feature baseline: shuffled samples (default) or Gaussian noise")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample, positions and baseline")
    p.add_argument("--output", default=None, help="folder (default: <artifacts>/<study>/svcca-trial-N)")
    p.add_argument("--no-attach", action="store_true", help="do not attach the plots to the study")
    _format_arg(p)
    p.set_defaults(handler=cmd_svcca)

    p = sub.add_parser("report", help="plots and a Markdown summary of a study (attached to it as artifacts)")
    p.add_argument("name", help="study name")
    _storage_arg(p)
    p.add_argument("--output", default=None, help="folder (default: <artifacts>/<study>/report)")
    p.add_argument("--no-attach", action="store_true", help="do not attach the files to the study")
    p.add_argument("--measure-latency", action="store_true",
                   help="time every trained model here, one at a time (median and interquartile range), and store "
                        "the figures with the study before the report uses them")
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser("export", help="the study's answer (the chosen cut's model, or its ensemble) or a given trial's "
                       "model as TorchScript and ONNX with a model card")
    p.add_argument("name", help="study name")
    _storage_arg(p)
    p.add_argument("--trial", default=None, help="trial number, or baselines:N for a trial of the baselines study "
                   "(default: the chosen cut's best trial, or every member when the answer is an ensemble)")
    p.add_argument("--output", required=True, help="folder for the model files and card")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.set_defaults(handler=cmd_export)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose == 0:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return args.handler(args)
    except TTLSearchError as exc:
        print(f"ttl-search: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ttl-search: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and friends
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
