"""What a head version is judged by, in numpy: the trainer's cross-validation and the gate use the same."""

from __future__ import annotations

import numpy as np

from node.model.gate import dice


def mask_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two label maps' foregrounds (> 0); 1 where both are empty."""
    return dice(pred > 0, truth > 0)


def classification_metrics(p: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """AUC (Mann-Whitney), accuracy and sensitivity at the operating point."""
    pos, neg = p[y == 1], p[y == 0]
    auc = (
        float(
            ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum())
            / (len(pos) * len(neg))
        )
        if len(pos) and len(neg)
        else float("nan")
    )
    hit = p >= threshold
    return {
        "auc": round(auc, 4),
        "accuracy": round(float((hit == (y == 1)).mean()), 4),
        "sensitivity": round(float(hit[y == 1].mean()), 4) if len(pos) else float("nan"),
    }
