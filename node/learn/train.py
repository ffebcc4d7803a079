"""``pacs-node heads train``: a light head on the frozen backbone's features, cross-validated, written
as a new version of that head (needs PyTorch: the ``train`` and ``import`` extras).

A segmentation head is pacs-node's segmentation decoder
(:func:`node.model.importers.heads.segmentation_decoder`): the slice and its patch tokens in, the
structure's probability per pixel out. A classification head is a linear probe on the series' mean
CLS token, calibrated (temperature) on its out-of-fold probabilities. The backbone never runs during
training: its features come from the feature cache (:mod:`node.learn.examples`).
Quality is measured by k-fold cross-validation over series (no series in two folds), then the head
is trained once more on every series and exported; the version folder gets its graph, its card,
its metrics and the hashed series it learned from (:mod:`node.model.head_versions`). Nothing else in
the model folder changes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

from node.errors import ModelError
from node.learn.examples import Example
from node.learn.fast_cpu import fast_cpu
from node.learn.metrics import classification_metrics, mask_dice
from node.model import head_versions
from node.model.importers.heads import SEGMENTATION, read_own_head, segmentation_decoder, write_own_head
from node.model.manifest import ModelSpec

try:
    import torch
    from torch.nn import functional as F
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("training a head needs PyTorch: pip install 'pacs-node[train,import]'") from e

ANATOMY = {"value": "91723000", "meaning": "Anatomical Structure"}


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch: int = 16
    lr: float = 3e-3
    folds: int = 3
    seed: int = 0
    crop: int = 64  # pixels, a multiple of the patch: the decoder is convolutional, crops train it 4x faster


@dataclass(frozen=True)
class Trained:
    version: str
    folder: Path
    measure: str  # what ``value`` is: "Dice" (segmentation) or "AUC" (classification)
    value: float | None  # cross-validated; None when not cross-validated (``folds`` < 2)
    seconds: float

    def line(self) -> str:
        quality = (
            f"cross-validated {self.measure} {self.value:.3f}"
            if self.value is not None
            else "not cross-validated"
        )
        return f"version {self.version} in {self.folder}: {quality} ({self.seconds:.0f} s)"


def _shape(examples: list[Example]) -> tuple[int, int, int]:
    """(hidden, patch, size) of the backbone the features came from."""
    f = examples[0].features
    size = int(f.image.shape[-1])
    hidden, tokens = int(f.tokens.shape[-1]), int(f.tokens.shape[1])
    return hidden, size // int(round(tokens**0.5)), size


def fit(examples: list[Example], cfg: TrainConfig):
    """The decoder trained on these series' slices (cross-entropy + soft Dice), slices that show the
    structure drawn two times in three so a small structure is not drowned by empty slices."""
    hidden, patch, _ = _shape(examples)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = _device()
    module = segmentation_decoder(hidden, patch, 2).to(device)
    tokens = np.concatenate([e.features.tokens for e in examples])
    images = np.concatenate([e.features.image for e in examples])
    target = np.concatenate([e.target for e in examples])
    showing = np.flatnonzero(target.reshape(len(target), -1).any(axis=1))
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps)
    module.train()
    size, grid = images.shape[-1], int(round(tokens.shape[1] ** 0.5))
    crop = min(size, max(patch, cfg.crop // patch * patch))
    # denormals only: in channels-last layout the test department's aorta head came out below its gate
    with fast_cpu():
        for _ in range(cfg.steps):
            pick = rng.integers(0, len(target), cfg.batch)
            if len(showing):
                lucky = rng.random(cfg.batch) < 2 / 3
                pick[lucky] = rng.choice(showing, int(lucky.sum()))
            t, x, y = (
                v.to(device) for v in _crops(tokens[pick], images[pick], target[pick], grid, patch, crop, rng)
            )
            logits = module.logits(t, x)
            p = torch.softmax(logits, 1)[:, 1]
            inter, total = (p * (y == 1)).sum(), p.sum() + (y == 1).sum()
            loss = F.cross_entropy(logits, y) + 1 - (2 * inter + 1) / (total + 1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return module.cpu().eval()


def _device():
    """A GPU when there is one: the decoder's steps are most of a head's training time."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _crops(tokens, images, target, grid: int, patch: int, crop: int, rng):
    """The same ``crop`` x ``crop`` window of each slice, its patch tokens and its label, on patch
    boundaries; centred near the structure where the slice shows it."""
    g = crop // patch
    t = np.empty((len(tokens), g * g, tokens.shape[-1]), np.float32)
    x = np.empty((len(images), images.shape[1], crop, crop), np.float32)
    y = np.empty((len(target), crop, crop), np.int64)
    for i in range(len(tokens)):
        rows, cols = np.nonzero(target[i])
        if len(rows) and rng.random() < 0.8:
            k = rng.integers(len(rows))
            r0, c0 = (
                np.array([rows[k], cols[k]]) // patch - g // 2 + rng.integers(-g // 4, g // 4 + 1, 2)
            ).clip(0, grid - g)
        else:
            r0, c0 = rng.integers(0, grid - g + 1, 2)
        t[i] = tokens[i].reshape(grid, grid, -1)[r0 : r0 + g, c0 : c0 + g].reshape(g * g, -1)
        x[i] = images[i][:, r0 * patch : r0 * patch + crop, c0 * patch : c0 * patch + crop]
        y[i] = target[i][r0 * patch : r0 * patch + crop, c0 * patch : c0 * patch + crop]
    return torch.from_numpy(t), torch.from_numpy(x), torch.from_numpy(y)


def dice(module, examples: list[Example]) -> list[float]:
    """Dice of the head's mask against the label, per series, in the model's plane."""
    out = []
    with torch.no_grad():
        for e in examples:
            pred = []
            for s in range(0, e.features.slices, 32):
                t = torch.from_numpy(e.features.tokens[s : s + 32].astype(np.float32))
                x = torch.from_numpy(e.features.image[s : s + 32].astype(np.float32))
                pred.append(module(t, x).argmax(1).numpy())
            out.append(mask_dice(np.concatenate(pred), e.target))
    return out


def _folds(kinds: list[str], k: int, seed: int) -> list[np.ndarray]:
    """k folds over the series (``kinds``: each one's modality, or ""), shuffled once: no series in
    two folds, and each kind dealt over the folds in turn, so every fold trains on every kind the
    final head does. (All CT in training and both MR series held out scored an aorta head 0.53
    where folds that each kept an MR series scored it 0.77-0.87, on the same six series.)"""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(np.asarray(kinds) == kind)) for kind in sorted(set(kinds))])
    return [order[i::k] for i in range(k)]


def _concept(code: str, name: str, label: str) -> dict:
    """``SCH:value`` as a manifest code; without one, a clearly local code named after the head."""
    scheme, _, value = code.partition(":") if code else ("99PACSNODE", "", name)
    return {"value": value or name, "scheme": scheme, "meaning": label}


def _staging(model: ModelSpec, name: str) -> tuple[str, Path]:
    """The next version's number and a hidden folder to build it in: no reader (a worker, ``heads
    status``) ever sees a version half written."""
    parent = model.path / head_versions.FOLDER / name
    parent.mkdir(parents=True, exist_ok=True)
    return head_versions.next_version(model.path, name), Path(
        tempfile.mkdtemp(dir=parent, prefix=".partial-")
    )


def _write_version(folder: Path, entry: dict, metrics: dict, card: str) -> None:
    """The version's description beside its graph, then the whole folder into place at once."""
    (folder / "head.yaml").write_text(yaml.safe_dump(entry, sort_keys=False))
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (folder / "card.md").write_text(card)
    final = folder.parent / metrics["version"]
    try:
        folder.rename(final)
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)
        raise ModelError(
            f"head {metrics['head']}: version {metrics['version']} was written meanwhile by another training; train again"
        ) from None


def cross_validate(examples: list[Example], cfg: TrainConfig) -> tuple[float, ...]:
    """Mean Dice of each fold's held-out series, the head trained on the other folds."""
    k = min(cfg.folds, len(examples))
    if k < 2:
        return ()
    folds = _folds([e.modality for e in examples], k, cfg.seed)
    scores = []
    for i, held in enumerate(folds):
        rest = [examples[j] for f in folds[:i] + folds[i + 1 :] for j in f]
        scores.append(float(np.mean(dice(fit(rest, cfg), [examples[j] for j in held]))))
    return tuple(round(s, 4) for s in scores)


def train_segmentation_head(
    model: ModelSpec,
    name: str,
    label: str,
    code: str,
    examples: list[Example],
    cfg: TrainConfig = TrainConfig(),
) -> Trained:
    """Cross-validate, train on every series, and write the next version of head ``name``."""
    from node.model.importers.huggingface import export_own_head

    if not examples:
        raise ValueError(f"head {name}: no labelled series with a segment {label}")
    t0 = time.monotonic()
    folds = cross_validate(examples, cfg)
    module = fit(examples, cfg)
    hidden, patch, size = _shape(examples)
    version, folder = _staging(model, name)
    labels = [{"index": 1, "name": label, "category": ANATOMY, "type": _concept(code, name, label)}]
    config = {"pacs_node_head": SEGMENTATION, "hidden_size": hidden, "labels": labels}
    write_own_head(folder / "source", module, config)
    head = read_own_head(folder / "source", config, hidden)
    export_own_head(head, folder / "head.onnx", hidden, patch, size)
    (folder / "head.onnx").with_suffix(".pt2").unlink(missing_ok=True)  # ONNX Runtime runs learned heads
    entry = {**head.manifest(), "name": name, "graph": "head.onnx"}
    dice = round(float(np.mean(folds)), 4) if folds else None
    trained = Trained(version, folder.parent / version, "Dice", dice, round(time.monotonic() - t0, 1))
    metrics = {
        "head": name,
        "version": version,
        "kind": "segmentation",
        "label": label,
        "backbone": f"{model.name} {model.base_version}",
        "cross_validated": {"folds": len(folds), "dice": dice, "dice_per_fold": list(folds)},
        "training": {**asdict(cfg), "seconds": trained.seconds, "series": sorted(e.series for e in examples)},
    }
    _write_version(folder, entry, metrics, _card(metrics))
    return trained


# --- classification: a linear head on the series' mean CLS token, calibrated -------------------------
PRESENT = {"value": "52101004", "meaning": "Present"}
ABSENT = {"value": "2667000", "meaning": "Absent"}


def pooled(example: Example) -> np.ndarray:
    """The series' feature a classification head reads: its slices' CLS tokens, averaged (``reads: cls``)."""
    return example.features.cls.astype(np.float64).mean(axis=0)


def fit_linear(x: np.ndarray, y: np.ndarray, cfg: TrainConfig):
    """Logistic regression on pooled CLS features (Curia's linear probe), L2-regularised, full batch."""
    torch.manual_seed(cfg.seed)
    module = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 1), torch.nn.Sigmoid())
    xs, ys = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32))
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr * 3, weight_decay=1e-3)
    for _ in range(cfg.steps):
        loss = F.binary_cross_entropy(module(xs)[:, 0], ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return module.eval()


def probabilities(module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x.astype(np.float32)))[:, 0].double().numpy()


def train_classification_head(
    model: ModelSpec,
    name: str,
    label: str,
    code: str,
    examples: list[Example],
    cfg: TrainConfig = TrainConfig(),
) -> Trained:
    """Out-of-fold probabilities (k folds over series) give the quality and the calibration (temperature,
    fitted on held-out folds; ECE before and after, cross-fitted, and the reliability diagram); the head
    is then trained on every series and written as the next version of ``name``."""
    from node.learn.calibration import fit as fit_calibration
    from node.learn.calibration import reliability_png

    x = np.stack([pooled(e) for e in examples])
    y = np.array([int(e.target) for e in examples])
    if len(set(y)) < 2:
        raise ValueError(
            f"head {name}: the label sets hold only {'positive' if y.any() else 'negative'} series"
        )
    t0 = time.monotonic()
    k = max(2, min(cfg.folds, int(min(y.sum(), len(y) - y.sum()))))
    oof = np.empty(len(y))
    for held in _folds([e.modality for e in examples], k, cfg.seed):
        rest = np.setdiff1d(np.arange(len(y)), held)
        oof[held] = probabilities(fit_linear(x[rest], y[rest], cfg), x[held])
    report = fit_calibration(oof, y, "temperature", folds=k, seed=cfg.seed)
    stated = report.held_out if report.improves else oof  # the probabilities the head will state
    module = fit_linear(x, y, cfg)
    version, folder = _staging(model, name)
    _export_linear(module, x.shape[1], folder / "head.onnx")
    entry = {
        "name": name, "kind": "classification", "graph": "head.onnx", "inputs": ["cls"], "reads": "cls",
        "finding": _concept(code, name, label), "positive": PRESENT,
        "negative": ABSENT, "threshold": 0.5, "outputs": ["sr"],
    }  # fmt: skip
    if report.improves:
        entry["calibration"] = report.calibration.model_dump(exclude_defaults=True)
    reliability_png(
        folder / "reliability.png", oof, report.held_out, y, f"{name} {version}: {k}-fold, {len(y)} series"
    )
    quality = classification_metrics(stated, y)
    trained = Trained(
        version, folder.parent / version, "AUC", quality["auc"], round(time.monotonic() - t0, 1)
    )
    metrics = {
        "head": name, "version": version, "kind": "classification", "label": label,
        "backbone": f"{model.name} {model.base_version}",
        "cross_validated": {"folds": k, **quality, "ece_before": round(report.ece_before, 4), "ece_after": round(report.ece_after, 4)},
        "training": {**asdict(cfg), "seconds": trained.seconds, "series": sorted(e.series for e in examples), "positives": int(y.sum())},
    }  # fmt: skip
    cv = metrics["cross_validated"]
    card = (
        f"# Head {name}, version {version}\n\n"
        f"A classification head for **{label}** (a linear probe on the mean CLS token of {model.name} "
        f"{model.base_version}), trained on {len(y)} labelled series ({int(y.sum())} positive).\n\n"
        f"| {k}-fold cross-validated | value |\n| --- | ---: |\n"
        f"| AUC | {cv['auc']:.3f} |\n| accuracy at 0.5 | {cv['accuracy']:.3f} |\n| sensitivity at 0.5 | {cv['sensitivity']:.3f} |\n"
        f"| ECE before calibration | {cv['ece_before']:.3f} |\n| ECE after (temperature {report.calibration.temperature:.2f}"
        f"{'' if report.improves else '; not applied: it would not lower the ECE'}) | {cv['ece_after']:.3f} |\n\n"
        "![reliability diagram](reliability.png)\n\n"
        "It is not active until `pacs-node heads activate` has judged it on the golden set.\n"
    )
    _write_version(folder, entry, metrics, card)
    return trained


def _export_linear(module, width: int, out: Path) -> None:
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (torch.zeros(1, width),), str(out), input_names=["features"], output_names=["probability"],
            dynamic_axes={"features": {0: "n"}, "probability": {0: "n"}}, dynamo=False,
        )  # fmt: skip


def _shown(value: float | None) -> str:
    return "not cross-validated" if value is None else f"{value:.3f}"


def _card(m: dict) -> str:
    cv = m["cross_validated"]
    return (
        f"# Head {m['head']}, version {m['version']}\n\n"
        f"A {m['kind']} head for **{m['label']}** on the frozen backbone of {m['backbone']}, trained by "
        f"`pacs-node heads train` on {len(m['training']['series'])} labelled series of this department "
        f"(listed by hashed Series Instance UID in metrics.json).\n\n"
        f"| measure | value |\n| --- | --- |\n"
        f"| Dice, {cv['folds']}-fold cross-validated (model plane) | {_shown(cv['dice'])} |\n"
        f"| Dice per fold | {', '.join(f'{d:.3f}' for d in cv['dice_per_fold']) or '-'} |\n"
        f"| training steps, seconds | {m['training']['steps']}, {m['training']['seconds']} |\n\n"
        "It is not active until `pacs-node heads activate` has judged it on the golden set.\n"
    )
