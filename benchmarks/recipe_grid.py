"""Benchmark: the small grid that chose the demo's training recipe, decided on validation only.

Each recipe trains EfficientNet-Lite0 (ImageNet weights) on BreastMNIST at 64 px at three cuts of
different depth (6, 12, 18) with seed 0 (``--seeds`` for more), and is scored by its mean
validation AUROC over those cuts and seeds.
The recipe with the best mean validation AUROC wins; test AUROC is printed for the record only.

    python benchmarks/recipe_grid.py [--recipes old A B C E] [--cuts 6 12 18] [--seeds 0 1] [--data ../shared/datasets]

With several seeds it also prints, per recipe and cut, the AUROC of the seeds' averaged class
probabilities next to their mean (the measurement behind the demo's ``selection.ensemble: 3``:
``--recipes E --cuts 4 6 9 12 --seeds 0 1 2``).

About 1.5 minutes per (recipe, cut) at 20 epochs on one core of a 2-core CPU; ``--jobs 2`` runs
two at once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

RECIPES = {
    "old": dict(lr=3e-4, max_epochs=8, early_stopping=4),
    "A": dict(lr=1e-4, max_epochs=20, early_stopping=6, class_weighted=True),
    "B": dict(lr=3e-4, max_epochs=20, early_stopping=6, class_weighted=True),
    "C": dict(lr=1e-4, max_epochs=20, early_stopping=6),
    "E": dict(lr=3e-4, max_epochs=20, early_stopping=6, class_weighted=True, optimizer="adamw", weight_decay=0.05),
    "G": dict(lr=1e-3, max_epochs=20, early_stopping=6, class_weighted=True),
}
RECIPES.update({f"E-ema{round(decay * 100)}": {**RECIPES["E"], "ema": decay} for decay in (0.95, 0.98)})
"""``old``: the demo before (Adam 3e-4, 8 epochs). ``E`` won on validation and is the demo's now;
``E-ema95``/``E-ema98`` (E with a weight average, ``trial.ema``) lost to it on validation."""


def train(recipe: str, cut: int, seed: int, data: str) -> dict:
    from ttl_search.data import DataConfig
    from ttl_search.train.trial import TrialConfig, run_trial

    kw = dict(backbone="efficientnet_lite0", weights="imagenet", data=DataConfig("breastmnist", root=data),
              input_size=64, batch_size=32, latency_repeats=0, threads=1, cut=cut, seed=seed, lr_patience=3)
    kw.update(RECIPES[recipe])
    from ttl_search.train.predictions import decode_predictions

    start = time.time()
    r = run_trial(TrialConfig(**kw))
    probs = {split: decode_predictions(r.predictions[split]) for split in ("val", "test")}
    return dict(recipe=recipe, cut=cut, seed=seed, val=r.val.get("auroc"), test=r.test.get("auroc"),
                best_epoch=r.best_epoch, epochs=r.epochs, seconds=round(time.time() - start, 1), probs=probs)


def ensemble_rows(rows: list[dict]) -> list[dict]:
    """Per (recipe, cut) trained with several seeds: the mean AUROC of the single models and the
    AUROC of their averaged class probabilities (what ``selection.ensemble`` answers with)."""
    from ttl_search.train.metrics import metric_value

    out = []
    for key in dict.fromkeys((r["recipe"], r["cut"]) for r in rows):
        mine = [r for r in rows if (r["recipe"], r["cut"]) == key]
        if len(mine) < 2:
            continue
        row = dict(recipe=key[0], cut=key[1], seeds=len(mine))
        for split in ("val", "test"):
            labels = mine[0]["probs"][split][0]
            mean = sum(r["probs"][split][1] for r in mine) / len(mine)
            row[f"{split} single"] = statistics.fmean(r[split] for r in mine)
            row[f"{split} ensemble"] = metric_value("auroc", labels, mean)
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["old", "A", "B", "C", "E"], choices=list(RECIPES))
    parser.add_argument("--cuts", nargs="+", type=int, default=[6, 12, 18])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--data", default=os.environ.get("TTL_SEARCH_DATA",
                                                         str(Path(__file__).resolve().parents[2] / "shared" / "datasets")))
    args = parser.parse_args(argv)
    jobs = [(r, c, seed, args.data) for seed in args.seeds for r in args.recipes for c in args.cuts]
    rows = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(train, *zip(*jobs)):
            print(json.dumps({k: v for k, v in row.items() if k != "probs"}), flush=True)
            rows.append(row)
    print(f"\n{'recipe':8} {'mean val AUROC':>14} {'mean test AUROC':>15}  settings")
    means = {}
    for recipe in args.recipes:
        mine = [r for r in rows if r["recipe"] == recipe]
        means[recipe] = statistics.fmean(r["val"] for r in mine)
        print(f"{recipe:8} {means[recipe]:14.4f} {statistics.fmean(r['test'] for r in mine):15.4f}  {RECIPES[recipe]}")
    print(f"chosen on validation: {max(means, key=means.get)}")
    ensembles = ensemble_rows(rows)
    if ensembles:
        print(f"\nseeds averaged (class probabilities), AUROC:\n{'recipe':8} {'cut':>3} {'seeds':>5} "
              f"{'val single':>10} {'val ensemble':>12} {'test single':>11} {'test ensemble':>13}")
        for e in ensembles:
            print(f"{e['recipe']:8} {e['cut']:3d} {e['seeds']:5d} {e['val single']:10.4f} {e['val ensemble']:12.4f} "
                  f"{e['test single']:11.4f} {e['test ensemble']:13.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
