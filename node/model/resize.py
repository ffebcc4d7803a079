"""Whole-slice resizing exactly as PyTorch does it, without PyTorch.

Foundation models trained with ``torch.nn.functional.interpolate(x, size, mode="bicubic",
antialias=True, align_corners=False)`` (Curia's image processor among them) must see the same
pixels at run time. That resize is separable: each output pixel along an axis is a normalised,
truncated sum of input pixels weighted by Keys' cubic kernel (a = -0.5), stretched by the scale
factor when shrinking (the anti-aliasing). This module builds those weights as one small matrix
per axis, following PyTorch's ``_compute_weights_aa`` (aten/src/ATen/native/cpu/UpSampleKernel.cpp),
so a slice is resized by two matrix products: ``rows @ slice @ cols.T``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

KEYS_A = -0.5  # PyTorch (and PIL) use -0.5 for antialiased bicubic, -0.75 without antialiasing
BICUBIC_SUPPORT = 4  # taps of the kernel at scale 1


def _cubic(x: np.ndarray, a: float = KEYS_A) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@lru_cache(maxsize=32)
def bicubic_aa_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of PyTorch's antialiased bicubic resize along one axis.

    Computed in float32, as PyTorch does for a float32 tensor: the scale, each tap's centre and the
    truncated window bounds round the same way, so the same input pixels get the same weights
    (in float64 the windows can differ by one tap, a visible difference on HU values)."""
    f = np.float32
    scale = f(n_in) / f(n_out)  # align_corners=False, no explicit scale factor
    support = f(BICUBIC_SUPPORT * 0.5) * scale if scale >= 1.0 else f(BICUBIC_SUPPORT * 0.5)
    invscale = f(1.0) / scale if scale >= 1.0 else f(1.0)
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        center = scale * (f(i) + f(0.5))
        # C++ casts truncate toward zero; both bounds are then clamped to the input
        xmin = max(int(center - support + f(0.5)), 0)
        xmax = min(int(center + support + f(0.5)), n_in)
        j = np.arange(xmin, xmax, dtype=f)
        w = _cubic((j - center + f(0.5)) * invscale).astype(f)
        total = w.sum(dtype=f)
        if total != 0.0:
            w = w / total
        m[i, xmin:xmax] = w
    m.setflags(write=False)
    return m


def resize_bicubic_aa(slices: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(S, H, W) -> (S, size[0], size[1]) float32, as PyTorch's antialiased bicubic resize."""
    rows = bicubic_aa_matrix(slices.shape[-2], size[0]).astype(np.float64)
    cols = bicubic_aa_matrix(slices.shape[-1], size[1]).astype(np.float64)
    out = np.matmul(rows, np.matmul(np.asarray(slices, np.float64), cols.T))
    return out.astype(np.float32)
