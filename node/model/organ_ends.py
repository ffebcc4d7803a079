"""An organ's end is no lesion: the one 3D rule a slice-by-slice lesion head cannot learn.

One slice through an organ's end looks like a lesion: the liver's tip is a disc brighter than the
fat around it, as a hyperdense lesion is; the liver's dome inside the lung is soft tissue in air, as
a nodule is. The next slice tells them apart: there the organ head sees that organ under the same
footprint. So a lesion component is taken for an organ's end, and not reported, when one slice
past its first or last slice one organ lies under most of its footprint, and in its own slices it
is a large share of that organ's cross-section (the organ tapering into it).

A true lesion keeps its place: inside an organ it is a small share of the organ's cross-section
(a liver lesion in the liver, a nodule in the lung, whatever lies one slice on). What the rule
costs: a lesion that fills an organ's pole (a kidney's) is cleared too.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BEYOND = 0.5  # of the lesion's end footprint that one organ covers one slice on
COVERS = 0.3  # of that organ's cross-section (with the lesion) in the lesion's own slices: an end, not a lesion in it


def drop_organ_ends(
    lesion: np.ndarray, conf: np.ndarray, organs: np.ndarray, acquired: np.ndarray | None = None
) -> int:
    """Clear, in place, every lesion component of ``lesion`` (slices, rows, cols: the model's plane)
    that is an organ's end by ``organs`` (the organ head's labels on the same grid); its confidence
    becomes the background's. ``acquired``: where the grid holds acquired voxels (an oblique
    slab's resampled grid does not everywhere); an organ's cross-section cut by the slab's edge
    says nothing, so it never clears. Returns how many were cleared."""
    comps, _ = ndimage.label(lesion > 0)
    cleared = 0
    for i, box in enumerate(ndimage.find_objects(comps), start=1):
        if box is None:
            continue
        z0, z1 = box[0].start, box[0].stop
        mine = comps[z0:z1] == i
        if _an_end(mine, organs, z0, z1, acquired):
            lesion[z0:z1][mine] = 0
            c = conf[z0:z1]
            c[mine] = 255 - c[mine]
            cleared += 1
    return cleared


def _an_end(mine: np.ndarray, organs: np.ndarray, z0: int, z1: int, acquired: np.ndarray | None) -> bool:
    """Whether the lesion ``mine`` (its slices z0..z1) is a large share of an organ's cross-section
    while that organ goes on one slice past it."""
    for beyond, end in ((z0 - 1, mine[0]), (z1, mine[-1])):
        if not 0 <= beyond < len(organs):
            continue
        under = organs[beyond][end]
        organ = int(np.bincount(under).argmax())
        if organ == 0 or (under == organ).mean() < BEYOND:
            continue
        section = 0  # the organ's cross-sections that hold the lesion, the lesion included
        for z in range(z0, z1):
            pieces, _ = ndimage.label((organs[z] == organ) | mine[z - z0])
            piece = np.isin(pieces, np.unique(pieces[mine[z - z0]]))
            if acquired is not None and not acquired[z][ndimage.binary_dilation(piece)].all():
                break  # cut by the slab's edge: its size says nothing
            section += piece.sum()
        else:
            if mine.sum() >= COVERS * section:
                return True
    return False
