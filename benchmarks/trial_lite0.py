"""Benchmark: pretrained vs random-init EfficientNet-Lite0 on BreastMNIST at 64 px (one trial each).

Prints test AUROC, time and cost of both, next to MedMNIST v2's ResNet-18 (28) from-scratch test
AUC of 0.901. Usage: python benchmarks/trial_lite0.py [--epochs 20] [--data ../shared/datasets]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ttl_search.data import DataConfig
from ttl_search.train.trial import TrialConfig, run_trial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--cut", type=int, default=None, help="default: the whole backbone")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    args = parser.parse_args()
    print(f"{'weights':10} {'time_s':>7} {'epochs':>6} {'best':>4} {'val_auroc':>9} {'test_auroc':>10} "
          f"{'test_acc':>8} {'params':>9} {'MACs':>11} {'lat_b1_ms':>9}")
    for weights in ("imagenet", "none"):
        cfg = TrialConfig(backbone="efficientnet_lite0", weights=weights, cut=args.cut, input_size=64, batch_size=32,
                          max_epochs=args.epochs, lr=args.lr, data=DataConfig("breastmnist", root=args.data))
        start = time.perf_counter()
        r = run_trial(cfg)
        print(f"{weights:10} {time.perf_counter() - start:7.1f} {r.epochs:6d} {r.best_epoch:4d} {r.val['auroc']:9.4f} "
              f"{r.test['auroc']:10.4f} {r.test['accuracy']:8.4f} {r.params:9d} {r.macs:11d} "
              f"{r.latency_ms['batch1']:9.2f}", flush=True)
    print("reference: MedMNIST v2 ResNet-18 (28) from scratch, BreastMNIST test AUC 0.901")


if __name__ == "__main__":
    main()
