"""pacs-node's own head formats: the segmentation decoder and the presence classifier read off one.

A head folder holds ``config.json`` (``pacs_node_head``: which architecture, its sizes, and what the
manifest says of the head: labels with their codes, or the coded finding) and ``model.safetensors``
(the weights, as ``torch``'s ``state_dict`` names them). ``pacs-node models train`` writes them
beside the Hugging Face backbone; the importer rebuilds each module here, loads the weights and
exports the ONNX graph and its ``torch.export`` twin, as it does for a Hugging Face classifier.
Import time only: PyTorch is not a runtime dependency.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from node.errors import ModelError

SEGMENTATION = "segmentation_decoder"
# the context decoder's soft cumulative histogram: sigmoids this steep (about 0.1 z-units wide),
# this many, evenly over this range of heights above air (fat lies at 1.3-3.6 in body slices);
# the width of the window its mean-shift finds fat's mode with (CT noise of 5-25 HU is 0.01-0.06);
# windows on the CT numbers found
PROBES, PROBE_GAIN, PROBE_RANGE = 48, 40.0, (0.0, 4.5)
FAT_WIDTH = 0.03
HU_WINDOWS = 6
PRESENCE = "decoder_presence"
ARCHITECTURES = (SEGMENTATION, PRESENCE)


def _exact():
    """fp32 for what follows, also inside a bf16 autocast (the reference recipe's decoders train in
    one, ``Config.bf16``): outside one, nothing (an exported graph holds no trace of it)."""
    from contextlib import nullcontext

    import torch

    return torch.autocast("cpu", enabled=False) if torch.is_autocast_enabled("cpu") else nullcontext()


def _torch():
    import torch
    from torch import nn
    from torch.nn import functional as F

    return torch, nn, F


def segmentation_decoder(
    hidden: int,
    patch: int,
    classes: int,
    widths: tuple[int, int, int] = (8, 16, 32),
    windows: int = 6,
    context: bool = False,
):
    """A light U-Net on the slice with the backbone's patch tokens joined at a quarter of its size.

    The slice path is what keeps small lesions: an 8x8-pixel token alone cannot outline a
    3-pixel lesion. It starts with learned soft windows (``tanh(gain * (z - centre))``): in a slice
    z-scored over air and body, soft-tissue contrasts of 20-70 HU are a few hundredths of a unit,
    and a window is what a radiologist would use to see them.

    ``context``: CT numbers found again. Curia's per-slice z-score puts a given HU at a place that
    moves with what else the slice holds (air, lung, fat), and liver (60 HU) and soft tissue (40)
    end up a few hundredths of a unit apart, closer than that place moves. So the head calibrates
    each slice against two tissues every body slice shows: air, its lowest value (clipped at -1000
    HU), and fat (-100 HU), found as the mode of the slice's histogram near where a small network
    on that histogram (:data:`PROBES`) puts it, taught to (``calibration``). The slice's CT numbers
    then feed windows of their own, gated by how sure the network is that the slice is CT with air
    in it (an MR slice, or a field of view inside the body, has no such reference).
    (N, T, D) tokens + (N, 1, S, S) slice -> (N, K, S, S) class probabilities.
    """
    torch, nn, F = _torch()
    c1, c2, c3 = widths

    def block(cin, cout, stride=1):
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
            nn.GELU(),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.GELU(),
        )

    class SegmentationDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.window = nn.Conv2d(1, windows, 1)
            with torch.no_grad():  # centres spread over the body's z-range, steep enough to separate tissues
                gain = 10.0
                self.window.weight.fill_(gain)
                self.window.bias.copy_(-gain * torch.linspace(-0.5, 2.0, windows))
            if context:
                self.probes = nn.Conv2d(1, PROBES, 1)
                self.probes.requires_grad_(False)  # fixed: a soft cumulative histogram, not a feature
                with torch.no_grad():
                    self.probes.weight.fill_(PROBE_GAIN)
                    self.probes.bias.copy_(-PROBE_GAIN * torch.linspace(*PROBE_RANGE, PROBES))
                # the histogram -> (fat above air, in z-units; can the slice be calibrated)
                self.context = nn.Sequential(
                    nn.Linear(PROBES + 1, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 2)
                )
                self.hu_window = nn.Conv2d(1, HU_WINDOWS, 1)
                with torch.no_grad():  # centres from fat to beyond the kidneys, about 25 HU wide
                    self.hu_window.weight.fill_(4.0)
                    self.hu_window.bias.copy_(-4.0 * torch.linspace(-1.0, 3.0, HU_WINDOWS))
            inputs = 1 + windows + (HU_WINDOWS if context else 0)
            self.enc1, self.enc2, self.enc3 = block(inputs, c1), block(c1, c2, 2), block(c2, c3, 2)
            self.tokens = nn.Conv2d(hidden, c3, 1)
            self.mid = block(2 * c3, c3)
            self.dec2 = block(c3 + c2, c2)
            self.dec1 = nn.Sequential(
                nn.Conv2d(c2 + c1, c1, 3, padding=1), nn.GELU(), nn.Conv2d(c1, classes, 1)
            )

        def logits(self, tokens, image, hounsfield=None):
            """``hounsfield``: :meth:`hounsfield` of the whole slices ``image`` was cropped from (a
            crop may hold no air or fat to go by); computed here when not given."""
            n, t, d = tokens.shape
            size = image.shape[-1]
            grid = size // patch
            with _exact():  # the windows tell contrasts of a few hundredths of a z-unit, finer than bf16
                channels = [image, torch.tanh(self.window(image))]
                if context:
                    hu, ct = self.hounsfield(image) if hounsfield is None else hounsfield
                    channels.append(ct[:, :, None, None] * torch.tanh(self.hu_window(hu / 100)))
                channels = torch.cat(channels, 1)
            e1 = self.enc1(channels)
            e2 = self.enc2(e1)
            e3 = self.enc3(e2)
            f = self.tokens(tokens.transpose(1, 2).reshape(n, d, grid, grid))
            f = F.interpolate(f, size=e3.shape[-2:], mode="bilinear", align_corners=False)
            x = self.mid(torch.cat([e3, f], 1))
            x = F.interpolate(x, size=e2.shape[-2:], mode="bilinear", align_corners=False)
            x = self.dec2(torch.cat([x, e2], 1))
            x = F.interpolate(x, size=e1.shape[-2:], mode="bilinear", align_corners=False)
            return self.dec1(torch.cat([x, e1], 1))

        def histogram(self, image):
            """(N, 1, S, S) slices -> (N, PROBES + 1): the soft cumulative histogram of each slice's
            height above its lowest value (where CT numbers are a pure scale of it), averaged over
            4x4 pixels (16x less work; the tissues' peaks stand where they were, narrower), and
            the lowest value."""
            low = image.amin((2, 3), keepdim=True)
            small = F.avg_pool2d(image - low, 4)
            return torch.cat([torch.sigmoid(self.probes(small)).mean((2, 3)), low[:, :, 0, 0]], 1)

        def calibration(self, stats):
            """Per slice, from its :meth:`histogram`: fat's height above air in z-units as the
            network puts it, and the logit that the slice can be calibrated (CT, with air)."""
            out = self.context(stats)
            return F.softplus(out[:, 0]), out[:, 1]

        def hounsfield(self, image):
            """(N, 1, S, S) z-scored slices -> their CT numbers (HU) and (N, 1) the chance that
            these mean something (a CT slice with air in it)."""
            above_air = image - image.amin((2, 3), keepdim=True)
            fat, ct = self.calibration(self.histogram(image))
            with torch.no_grad():  # to the mode of the histogram near there: mean-shift
                fat = fat[:, None, None, None]
                for _ in range(3):
                    near = torch.exp(-0.5 * ((above_air - fat) / FAT_WIDTH) ** 2)
                    fat = (near * above_air).sum((2, 3), True) / (near.sum((2, 3), True) + 1e-6)
            return -1000 + 900 * above_air / fat.clamp_min(1e-3), torch.sigmoid(ct)[:, None]

        def forward(self, tokens, image):
            return torch.softmax(self.logits(tokens, image), dim=1)

    return SegmentationDecoder()


def decoder_ensemble(
    hidden: int,
    patch: int,
    classes: int,
    weights: tuple[float, ...],
    widths: tuple[int, int, int] = (8, 16, 32),
    windows: int = 6,
    context: bool = False,
):
    """Several segmentation decoders of one shape, their class probabilities averaged with ``weights``
    (summing to 1). Decoders trained apart rarely make the same mistake: where only one of them
    sees a lesion, the mean is less sure of it than where both do.
    (N, T, D) tokens + (N, 1, S, S) slice -> (N, K, S, S) class probabilities."""
    torch, nn, _ = _torch()

    class DecoderEnsemble(nn.Module):
        def __init__(self):
            super().__init__()
            self.members = nn.ModuleList(
                segmentation_decoder(hidden, patch, classes, widths, windows, context) for _ in weights
            )

        def forward(self, tokens, image):
            return sum(w * m(tokens, image) for w, m in zip(weights, self.members, strict=True))

    return DecoderEnsemble()


def decoder_presence(
    hidden: int,
    patch: int,
    widths: tuple[int, int, int] = (8, 16, 32),
    windows: int = 6,
    weights: tuple[float, ...] | None = None,
    context: bool = False,
):
    """A series-level finding read off a two-class segmentation decoder (an ensemble of them where
    ``weights``): each slice's score is its highest lesion probability averaged over 3x3 pixels (one
    noisy pixel is not a lesion); the series' is the highest of its slices (``reads: slices`` in
    the manifest). (N, T, D) tokens + (N, 1, S, S) slices -> (N,) probabilities."""
    torch, nn, F = _torch()

    class DecoderPresence(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = (
                decoder_ensemble(hidden, patch, 2, weights, widths, windows, context)
                if weights
                else segmentation_decoder(hidden, patch, 2, widths, windows, context)
            )

        def forward(self, tokens, image):
            lesion = self.decoder(tokens, image)[:, 1:]
            return F.avg_pool2d(lesion, 3, stride=1, padding=1).amax(dim=(1, 2, 3))

    return DecoderPresence()


@dataclass(frozen=True)
class OwnHead:
    """A head folder in pacs-node's format, read and checked against the backbone."""

    name: str
    architecture: str
    config: dict  # config.json as written: sizes and the manifest's words for the head
    folder: Path

    def module(self, hidden: int, patch: int):
        """The torch module with its weights loaded (strict: every tensor, none left over)."""
        from safetensors.torch import load_file

        c = self.config
        shape = {"widths": tuple(c.get("widths", (8, 16, 32))), "windows": int(c.get("windows", 6))}
        classes, context, weights = len(c.get("labels", ())) + 1, bool(c.get("context")), c.get("ensemble")
        if self.architecture == SEGMENTATION and weights:
            module = decoder_ensemble(hidden, patch, classes, tuple(weights), **shape, context=context)
        elif self.architecture == SEGMENTATION:
            module = segmentation_decoder(hidden, patch, classes, **shape, context=context)
        else:
            module = decoder_presence(hidden, patch, **shape, weights=weights and tuple(weights), context=context)
        path = self.folder / "model.safetensors"
        if not path.exists():
            raise ModelError(f"{self.folder}: no model.safetensors (the head's weights)")
        try:
            module.load_state_dict(load_file(str(path)), strict=True)
        except RuntimeError as e:  # names or shapes that are not this architecture's
            first = (str(e).splitlines() or [""])[0]
            raise ModelError(f"{path}: not the weights of a {self.architecture} head ({first})") from None
        return module.eval()

    def manifest(self) -> dict:
        c = self.config
        if self.architecture == SEGMENTATION:
            return {
                "name": self.name,
                "kind": "segmentation",
                "graph": f"head_{self.name}.onnx",
                "inputs": ["tokens", "image"],
                "labels": c["labels"],
                **({"organ_ends": c["organ_ends"]} if c.get("organ_ends") else {}),
            }
        return {
            "name": self.name,
            "kind": "classification",
            "graph": f"head_{self.name}.onnx",
            "inputs": ["tokens", "image"],
            "reads": "slices",
            **{k: c[k] for k in ("finding", "positive", "negative")},
            "threshold": float(c.get("threshold", 0.5)),
            "outputs": ["sr"],
            **({"calibration": c["calibration"]} if c.get("calibration") else {}),
        }


def read_own_head(folder: Path, config: dict, hidden: int) -> OwnHead:
    arch = config.get("pacs_node_head")
    if arch not in ARCHITECTURES:
        raise ModelError(
            f"{folder / 'config.json'}: unknown pacs_node_head {arch!r} (known: {', '.join(ARCHITECTURES)})"
        )
    if int(config.get("hidden_size", -1)) != hidden:
        raise ModelError(
            f"{folder}: the head reads tokens of width {config.get('hidden_size')}; the backbone gives {hidden}"
        )
    weights = config.get("ensemble")
    if weights is not None and not (
        isinstance(weights, list) and len(weights) > 1 and all(isinstance(w, (int, float)) and w > 0 for w in weights)
        and abs(sum(weights) - 1) < 1e-6
    ):  # fmt: skip
        raise ModelError(f"{folder / 'config.json'}: ensemble {weights!r} is not two or more positive weights summing to 1")
    if not isinstance(config.get("context", False), bool):
        raise ModelError(f"{folder / 'config.json'}: context {config['context']!r} is not true or false")
    need = ("labels",) if arch == SEGMENTATION else ("finding", "positive", "negative")
    missing = [k for k in need if not config.get(k)]
    if missing:
        raise ModelError(f"{folder / 'config.json'}: a {arch} head needs {', '.join(missing)}")
    name = folder.name.removeprefix("head_").removeprefix("head-") or folder.name
    return OwnHead(name, arch, config, folder)


def write_own_head(folder: Path, module, config: dict) -> Path:
    """Save a trained head in the format :func:`read_own_head` reads."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / "model.safetensors"))
    return folder
