"""The organ-end rule (node.model.organ_ends) on hand-drawn label maps: an organ's end, cut by one
slice, is cleared; a lesion inside an organ, wherever that organ goes on, is kept."""

from __future__ import annotations

import numpy as np
import pytest

from node.errors import ModelError
from node.model.inference import predict
from node.model.manifest import MODELS_DIR, load_model
from node.model.organ_ends import drop_organ_ends

LIVER, LUNG = 1, 4
SEED, CASES = 60_000, (5, 10)  # held-out phantoms (node.tools.evaluate), oblique: MR, where the rule clears one; CT


def disc(radius: float, size: int = 64, centre: tuple[int, int] = (32, 32)) -> np.ndarray:
    r, c = np.ogrid[:size, :size]
    return (r - centre[0]) ** 2 + (c - centre[1]) ** 2 <= radius**2


def run(lesion: np.ndarray, organs: np.ndarray, acquired=None) -> tuple[np.ndarray, np.ndarray, int]:
    labels = lesion.astype(np.uint8)
    conf = np.full(labels.shape, 200, np.uint8)
    cleared = drop_organ_ends(labels, conf, organs, acquired)
    return labels, conf, cleared


def liver_down_to(tip: int, slices: int = 8) -> np.ndarray:
    """The organ head's liver, wide down to slice ``tip`` - 1 and a small disc on ``tip``."""
    organs = np.zeros((slices, 64, 64), np.uint8)
    organs[:tip][:, disc(20)] = LIVER
    organs[tip][disc(6)] = LIVER
    return organs


def test_the_livers_tip_is_cleared_and_takes_the_backgrounds_confidence():
    organs = liver_down_to(5)
    lesion = np.zeros_like(organs, bool)
    lesion[5][disc(5)] = True  # the tip's last slice, as bright as a hyperdense lesion
    labels, conf, cleared = run(lesion, organs)
    assert cleared == 1 and not labels.any()
    assert (conf[lesion] == 55).all() and (conf[~lesion] == 200).all()


def test_an_organ_cut_by_an_oblique_slabs_edge_is_not_judged():
    organs = liver_down_to(5)
    lesion = np.zeros_like(organs, bool)
    lesion[5][disc(5)] = True
    acquired = np.ones(organs.shape, bool)
    acquired[5:, :, 36:] = False  # the tilted slab ends here: the section seen may be a cut one
    assert run(lesion, organs, acquired)[2] == 0
    acquired[5:, :, 36:] = True
    assert run(lesion, organs, acquired)[2] == 1


def test_a_lesion_inside_the_liver_is_kept_wherever_the_liver_goes_on():
    organs = liver_down_to(7)
    lesion = np.zeros_like(organs, bool)
    lesion[2:5][:, disc(6, centre=(30, 36))] = True
    labels, _, cleared = run(lesion, organs)
    assert cleared == 0 and (labels.astype(bool) == lesion).all()


def test_the_livers_dome_inside_the_lung_is_cleared_but_a_nodule_is_kept():
    organs = np.full((8, 64, 64), LUNG, np.uint8)
    organs[5][disc(12)] = LIVER  # the dome: the organ head sees the liver from slice 5 on
    organs[6:][:, disc(20)] = LIVER
    lesion = np.zeros_like(organs, bool)
    lesion[4][disc(4)] = True  # the dome's top, soft tissue in air: a nodule on this slice alone
    lesion[1:3][:, disc(3, centre=(12, 12))] = True  # a nodule, lung all round and above and below
    labels, _, cleared = run(lesion, organs)
    assert cleared == 1
    assert not labels[4].any() and labels[1:3].any()


def test_a_lesion_at_the_volumes_edge_or_over_background_is_kept():
    organs = liver_down_to(5)
    lesion = np.zeros_like(organs, bool)
    lesion[0][disc(4)] = True  # nothing before slice 0; the liver goes on after it, around it
    lesion[7][disc(4, centre=(10, 10))] = True  # nothing but background one slice on
    labels, _, cleared = run(lesion, organs)
    assert cleared == 0 and labels.sum() == lesion.sum()


def test_organ_ends_must_name_another_segmentation_head(tmp_path):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(MODELS_DIR / "phantom-fm", model)
    text = (model / "model.yaml").read_text()
    assert "organ_ends: organs" in text  # the reference model's lesion head uses the rule
    (model / "model.yaml").write_text(text.replace("organ_ends: organs", "organ_ends: liver"))
    with pytest.raises(ModelError, match="organ_ends names 'liver'"):
        load_model(model)


@pytest.mark.slow  # the reference model on a held-out phantom, with and without the rule (~10 s)
def test_the_reference_model_loses_only_false_lesions_to_the_rule():
    """Through the product's inference (an oblique series: the slab's edge known): what the rule
    clears touches no true lesion, and it does clear (an organ's end the lesion head took for one)."""
    from node.model.select import select_runtime
    from node.timing import Stopwatch
    from node.tools.evaluate import held_out_case

    model = load_model("phantom-fm")
    without = model.model_copy(
        update={"heads": tuple(h.model_copy(update={"organ_ends": None}) for h in model.heads)}
    )
    cleared = 0
    for k in CASES:
        series, _, truth = held_out_case(k, SEED)
        runs = [predict(series, m, select_runtime(m, "auto")[0], Stopwatch()) for m in (model, without)]
        kept, found = (r.labels["lesions"] > 0 for r in runs)
        assert not (kept & ~found).any()  # the rule only clears
        gone = found & ~kept
        assert not (gone & (truth.lesion > 0)).any(), f"case {k}: a true lesion cleared"
        cleared += int(gone.any())
    assert cleared >= 1
