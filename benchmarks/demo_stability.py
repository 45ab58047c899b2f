"""Benchmark: how stable the demo's answer is across study seeds, and how good it is on test.

Runs a study file (default ``studies/demo.yaml``) once per seed (``search.seed=S``, study name
``<name>-s<S>``; studies already in the database are reused), then prints per seed: the chosen cut,
its validation metric with its bootstrap interval, its test metric with its interval, and full
fine-tuning of the same backbone in the same study (TTL at the last cut, which the two-stage search
trains in stage 1), and the pick the other selection rule would make on the same trials. The test
split decides nothing here; it only measures.

    TTL_SEARCH_DATA=../shared/datasets python benchmarks/demo_stability.py --seeds 0 1 2 3 4
    python benchmarks/demo_stability.py --study old_demo.yaml --prefix old --set selection.rule=best
    python benchmarks/demo_stability.py --replay-only --reselect ensemble=indistinguishable

``--reselect KEY=VALUE`` re-chooses the stored studies' answers under other ``selection`` settings
(the rule, the interval, the ensemble) without training: selection reads only the stored trials.
An ensemble of seeds the studies did not train shows as incomplete.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from dataclasses import replace

from ttl_search.config import from_dict, merge, parse_overrides, to_dict
from ttl_search.results import chosen_cut, open_study, stored_candidates, stored_probe_models
from ttl_search.search.answer import study_answer, trial_evidence
from ttl_search.search.record import SEARCH_STRATEGY, completed_by_cut, fmt_count, fmt_diff, model_name, records, summarize_cut
from ttl_search.search.samplers import search_trials
from ttl_search.search.selection import SelectionConfig, score_candidates
from ttl_search.search.study import load_study_config
from ttl_search.storage import open_storage, study_names, study_trials

HERE = Path(__file__).resolve().parent


def run_seed(study: Path, seed: int, name: str, storage: str, overrides: list[str]) -> None:
    if name in study_names(open_storage(storage)):
        print(f"seed {seed}: reusing study {name}", flush=True)
        return
    from ttl_search.run.driver import run_study

    cfg = load_study_config(study, [*overrides, f"name={name}", f"search.seed={seed}"])
    cfg.storage = storage
    print(f"seed {seed}: running study {name}", flush=True)
    run_study(cfg)


def reselected(selection: SelectionConfig, items: list[str]) -> SelectionConfig:
    """``selection`` with ``KEY=VALUE`` items (keys of the ``selection`` block) applied, validated."""
    return from_dict(SelectionConfig, merge(to_dict(selection), parse_overrides(items)), prefix="selection.")


def best_ensemble(frame: pd.DataFrame) -> str:
    """What the table's ensembles average, for the summary line."""
    kinds = set(frame["ens kind"].dropna())
    return "the cuts indistinguishable from the best" if kinds == {"cuts"} else "the chosen cut's seeds"


def seed_row(seed: int, name: str, storage: str, reselect: list[str] = ()) -> dict:
    study, cfg = open_study(name, storage)
    if reselect:
        cfg = replace(cfg, selection=reselected(cfg.selection, reselect))
    trials = study_trials(study)
    best = chosen_cut(study, cfg, trials)
    searched = completed_by_cut(records(search_trials(trials, cfg.search.repeats)))  # single models, no ensemble seed
    metric, last = cfg.metric, max(c for s, c in searched if s == SEARCH_STRATEGY)
    evidence, _ = trial_evidence(search_trials(trials, cfg.search.repeats), "test")
    models = stored_probe_models(study)
    for key, ev in (models.evidence("test") if models else {}).items():
        evidence.setdefault(key, ev)
    tests = score_candidates(evidence, metric, cfg.resolved_direction, cfg.selection) if evidence else {}
    full = summarize_cut(searched[(SEARCH_STRATEGY, last)])
    other = "best" if best["rule"] == "smallest_within_ci" else "smallest_within_ci"
    other_cfg = replace(cfg, selection=replace(cfg.selection, rule=other))
    other_pick = study_answer(trials, other_cfg, stored_candidates(study, cfg), models).key
    chosen_test = tests.get((best["strategy"], best["cut"]))
    ens = best.get("ensemble")
    full_test = tests.get((SEARCH_STRATEGY, last))
    return {
        "seed": seed, "study": name, "rule": best["rule"], "trainings": len(trials), "pick": best["model"],
        "params": best["params"], "val": best["val"][metric],
        "val_ci": f"[{best['val_ci'][0]:.3f}, {best['val_ci'][1]:.3f}]" if best["val_ci"] else "-",
        "same_as_best": "; ".join(best["close"]), "test": best["test"][metric],
        "test_acc": best["test"].get("accuracy"),
        "test_ci": f"[{chosen_test.ci[0]:.3f}, {chosen_test.ci[1]:.3f}]" if chosen_test else "-",
        f"full (cut {last}) val": full.val.get(metric), f"full (cut {last}) test": full.test.get(metric),
        "full_test_ci": f"[{full_test.ci[0]:.3f}, {full_test.ci[1]:.3f}]" if full_test else "-",
        f"pick if rule {other}": model_name(*other_pick),
        "its test": tests[other_pick].value if other_pick in tests else None,
        "wall_s": sum((r.wall_s or 0) for r in records(trials)),
        "ensemble": (f"cuts {','.join(map(str, ens['cuts']))}" if ens["kind"] == "cuts" else ens["size"])
        if ens else 1,
        "ens kind": ens["kind"] if ens else None,
        "ens val": ens["val"] if ens else None,
        "ens test": ens["test"] if ens else None,
        "ens_test_ci": f"[{ens['test_ci'][0]:.3f}, {ens['test_ci'][1]:.3f}]" if ens and ens["test_ci"] else "-",
        "ens params": ens["params"] if ens else None,
        "ens vs best (val, paired)": fmt_diff(ens["diff"], ens["diff_ci"]) if ens else "-",
        "ens better": bool(ens and ens["diff_ci"] and ens["diff_ci"][0] > 0),
        "full params": best["full"]["params"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default=str(HERE.parent / "studies" / "demo.yaml"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--prefix", default=None, help="study name prefix (default: the file's name)")
    parser.add_argument("--storage", default=f"sqlite:///{(HERE / 'out' / 'demo_stability.db').resolve()}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="study overrides")
    parser.add_argument("--replay-only", action="store_true", help="only read studies already stored")
    parser.add_argument("--reselect", action="append", default=[], metavar="KEY=VALUE",
                        help="read the studies' answers under another selection.KEY (no training)")
    args = parser.parse_args(argv)
    (HERE / "out").mkdir(exist_ok=True)
    prefix = args.prefix or load_study_config(args.study, args.set).name
    rows = []
    for seed in args.seeds:
        name = f"{prefix}-s{seed}"
        if not args.replay_only:
            run_seed(Path(args.study), seed, name, args.storage, args.set)
        if name in study_names(open_storage(args.storage)):
            rows.append(seed_row(seed, name, args.storage, args.reselect))
    if not rows:
        print("no study to read", file=sys.stderr)
        return 2
    frame = pd.DataFrame(rows)
    print(tabulate(frame, headers="keys", tablefmt="github", showindex=False, floatfmt=".3f"))
    picks = collections.Counter(frame["pick"])
    full_test = next(c for c in frame.columns if c.startswith("full (cut") and c.endswith(" test"))
    cut, count = picks.most_common(1)[0]
    print(f"\npicks over {len(frame)} seeds: {dict(picks)}; the most frequent ({cut}) in {count}/{len(frame)}; "
          f"mean test {frame['test'].mean():.4f} (sd {frame['test'].std(ddof=0):.4f})")
    if frame["ens test"].notna().any():
        print(f"the answer as an ensemble ({best_ensemble(frame)}): mean validation {frame['ens val'].mean():.4f}, "
              f"mean test {frame['ens test'].mean():.4f} (sd {frame['ens test'].std(ddof=0):.4f}), "
              f"{fmt_count(frame['ens params'].mean())} parameters on average (the full model "
              f"{fmt_count(frame['full params'].iloc[0])}); full fine-tuning's mean test {frame[full_test].mean():.4f}")
        better = int(frame["ens better"].sum())
        verdict = "the ensemble" if better > len(frame) / 2 else "the single model"
        print(f"validation decides: the ensemble is significantly better than the best single model (paired) on "
              f"{better}/{len(frame)} seeds: {verdict} (the ensemble only when it wins on most seeds)")
    other = next(c for c in frame.columns if c.startswith("pick if rule"))
    print(f"{other}: {dict(collections.Counter(frame[other]))}; mean test {frame['its test'].mean():.4f} "
          f"(sd {frame['its test'].std(ddof=0):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
