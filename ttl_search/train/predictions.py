"""A split's predictions in a compact, JSON-ready form, so that any metric (and its bootstrap
interval) can be recomputed from a stored trial: labels as base64 ``int16``, class probabilities
as base64 ``float32`` (about 11 characters per sample of a binary task)."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np


def encode_predictions(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """``{"n", "k", "labels", "probs"}`` of integer ``labels`` (N,) and ``probs`` (N, K)."""
    labels = np.asarray(labels).reshape(-1)
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probs must have shape (N, K) with N = {labels.shape[0]}, got {probs.shape}")
    return {
        "n": int(probs.shape[0]), "k": int(probs.shape[1]),
        "labels": base64.b64encode(labels.astype("<i2").tobytes()).decode("ascii"),
        "probs": base64.b64encode(probs.astype("<f4").tobytes()).decode("ascii"),
    }


def decode_predictions(value: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(labels as int64 (N,), probs as float64 (N, K)) from :func:`encode_predictions`'s form;
    ``ValueError`` when it is malformed."""
    try:
        n, k = int(value["n"]), int(value["k"])
        labels = np.frombuffer(base64.b64decode(value["labels"]), dtype="<i2").astype(np.int64)
        probs = np.frombuffer(base64.b64decode(value["probs"]), dtype="<f4").astype(np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed stored predictions: {exc}") from exc
    if labels.shape != (n,) or probs.size != n * k:
        raise ValueError(f"stored predictions hold {labels.size} labels and {probs.size} probabilities, "
                         f"expected {n} and {n}x{k}")
    return labels, probs.reshape(n, k)
