"""The model repository: one folder per model, described by ``model.yaml``.

The manifest says what the model accepts (modalities, input geometry,
intensity handling), which graph is the backbone, and each head: its kind,
graph, inputs, and coded labels. A head is a separate graph, so adding one
never means re-exporting the backbone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from node.errors import ModelError
from node.model.calibration import Calibration
from node.model.head_versions import learned_entries

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"  # the repository's models/
DEFAULT_MODEL = "phantom-fm"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Code(_Strict):
    value: str
    scheme: str = "SCT"
    meaning: str


class Label(_Strict):
    index: int = Field(ge=1, description="class index in the head's output")
    name: str
    category: Code
    type: Code
    modifier: Code | None = Field(None, description="e.g. laterality: SCT 7771000 Left")
    kind: Literal["organ", "lesion"] = "organ"
    instances: bool = Field(False, description="split into connected components, one segment each")


class ScaleRange(_Strict):
    """MONAI's ``ScaleIntensityRange``: ``(v - a_min) / (a_max - a_min) * (b_max - b_min) + b_min``,
    then clipped to ``[b_min, b_max]`` when ``clip``."""

    a_min: float
    a_max: float
    b_min: float
    b_max: float
    clip: bool = False

    @model_validator(mode="after")
    def _span(self) -> ScaleRange:
        if self.a_max == self.a_min:
            raise ValueError("a_max equals a_min: no range to scale")
        return self


class IntensitySpec(_Strict):
    """How modality values become the model's input values.

    - ``windows``: CT through fixed HU windows, one channel each; MR scaled by the series' robust
      range (``mr_percentiles``) into as many channels (phantom-fm);
    - ``zscore``: raw values (HU, MR units), CT clipped below ``clip_below`` when set, then each slice
      minus its mean over its standard deviation (population) plus ``eps``; one channel (Curia);
    - ``dataset``: values clipped to ``clip`` when set, then ``(value - mean) / std`` with the training
      set's statistics; one channel (nnU-Net's ``CTNormalization``);
    - ``volume_zscore``: the whole volume minus its mean over its standard deviation (nnU-Net's
      ``ZScoreNormalization``; MONAI's ``NormalizeIntensity``, over the non-zero voxels only when
      ``nonzero``); one channel;
    - ``range``: MONAI's ``ScaleIntensityRange`` (``scale``); one channel.
    """

    kind: Literal["windows", "zscore", "dataset", "volume_zscore", "range"] = "windows"
    ct_windows: tuple[tuple[float, float], ...] = ((-1000.0, 1000.0), (-160.0, 240.0))
    mr_percentiles: tuple[float, float] = (1.0, 99.0)
    clip_below: float | None = Field(None, description="zscore, CT only: e.g. -1000 (clip below air)")
    eps: float = Field(1e-6, gt=0)
    mean: float = 0.0
    std: float = Field(1.0, gt=0)
    clip: tuple[float, float] | None = Field(None, description="dataset: e.g. the 0.5 and 99.5 percentiles")
    nonzero: bool = Field(
        False, description="volume_zscore: statistics of, and applied to, non-zero voxels only"
    )
    scale: ScaleRange | None = Field(None, description="range: MONAI's ScaleIntensityRange")

    @model_validator(mode="after")
    def _range(self) -> IntensitySpec:
        if (self.kind == "range") != (self.scale is not None):
            raise ValueError(
                "intensity range needs scale (a_min, a_max, b_min, b_max), and only range has one"
            )
        return self

    @property
    def channels(self) -> int:
        return len(self.ct_windows) if self.kind == "windows" else 1


class Resampling(_Strict):
    """How the volume reaches the network's spacing and the answer comes back.

    ``grid: nnunet``: nnU-Net's ``resample_data_or_seg_to_shape``: a spline of ``order`` (cubic for
    the image, linear for the logits), the anisotropic axis on its own with ``order_z`` when one
    spacing is more than ``anisotropy`` times the smallest (or as ``force_separate_z`` says).

    ``grid: monai``: MONAI's ``Spacingd``: ``round((n - 1) * spacing / target + 1)`` voxels, the first
    on the source's first voxel centre, values interpolated at voxel centres (align_corners False)
    linearly (order 1) or nearest (0), clamped at the border; the way back is ``Invertd``'s: the
    inverse map onto the source grid, of ``interpolate`` (the probabilities when ``Activationsd``
    softmax comes before it), linearly, or of the labels, nearest (``logits_order`` 0).
    """

    grid: Literal["nnunet", "monai"] = "nnunet"
    interpolate: Literal["logits", "probabilities"] = Field(
        "logits", description="what is interpolated on the way back (before the arg-max)"
    )
    data_order: int = Field(3, ge=0, le=5)
    logits_order: int = Field(1, ge=0, le=5)
    order_z: int = Field(0, ge=0, le=5)
    force_separate_z: bool | None = None
    anisotropy: float = Field(3.0, gt=1)

    @model_validator(mode="after")
    def _monai(self) -> Resampling:
        if self.grid == "monai" and max(self.data_order, self.logits_order) > 1:
            raise ValueError("grid monai interpolates linearly (order 1) or nearest (order 0)")
        return self


VOLUME_INTENSITIES = ("dataset", "volume_zscore", "range")  # what a patch3d network's input may use


def axes_valid(axes: str) -> bool:
    """Three direction letters, one of each pair L/R, A/P, S/I (e.g. RAS, LPS)."""
    pairs = {"L": "LR", "R": "LR", "A": "AP", "P": "AP", "S": "SI", "I": "SI"}
    return len(axes) == 3 and all(a in pairs for a in axes) and len({pairs[a] for a in axes}) == 3


class Patch3DSpec(_Strict):
    """How a 3D network sees a volume (``input.kind: patch3d``), in its own array order (Z, Y, X)."""

    # the directions the network's array axes x, y, z (SimpleITK's index order; numpy's last axis
    # first) increase towards: ``RAS`` for a network trained on nibabel-canonical NIfTI such as
    # TotalSegmentator's. nnU-Net does not reorient, so this is what its training images were.
    axes: str = Field(pattern=r"^[LRAPSI]{3}$")
    spacing: tuple[float, float, float] = Field(description="mm, (Z, Y, X) of the network's array")
    patch: tuple[int, int, int] = Field(description="voxels, (Z, Y, X)")
    step: float = Field(
        0.5,
        gt=0,
        le=1,
        description="tile step, a fraction of the patch (nnU-Net's tile_step_size; MONAI's 1 - overlap)",
    )
    mirror_axes: tuple[int, ...] = Field((), description="test-time mirroring over these array axes (0..2)")
    gaussian: bool = True
    resampling: Resampling = Resampling()
    # nnunet: nnU-Net's tiles spread evenly at most ``step`` apart, its Gaussian (sigma 1/8, peak 10,
    # float16); monai: SlidingWindowInferer's tiles every int(patch x step) voxels, the last moved back
    # inside, and its Gaussian (sigma ``sigma_scale`` x patch, peak 1, clamped at its minimum or 1e-3)
    tiling: Literal["nnunet", "monai"] = "nnunet"
    sigma_scale: float = Field(0.125, gt=0, description="monai tiling: the Gaussian's sigma over the patch")
    # nnU-Net crops to the non-zero voxels' box and normalises before resampling; a MONAI bundle
    # does neither unless its transforms say so
    crop_nonzero: bool = True
    normalise_first: bool = True

    @model_validator(mode="after")
    def _axes(self) -> Patch3DSpec:
        if not axes_valid(self.axes):
            raise ValueError(f"axes {self.axes}: one of L/R, one of A/P and one of S/I")
        if not set(self.mirror_axes) <= {0, 1, 2}:
            raise ValueError(f"mirror_axes {list(self.mirror_axes)}: array axes are 0, 1 and 2")
        if self.tiling == "nnunet" and self.sigma_scale != 0.125:
            raise ValueError("sigma_scale is for monai tiling (nnU-Net's Gaussian is 1/8 of the patch)")
        return self


class InputSpec(_Strict):
    kind: Literal["slice2d", "patch3d"] = "slice2d"
    size: int = Field(128, gt=0, description="in-plane pixels (2D)")
    volume: Patch3DSpec | None = Field(None, description="patch3d: the network's grid and tiling")
    # the plane the model's slices are taken in, from the patient-oriented volume: axial slices have
    # rows towards P and columns towards L, coronal I by L, sagittal I by P
    orientation: Literal["axial", "coronal", "sagittal"] = "axial"
    # fit: isotropic pixels, the field of view centred and padded, blurred then linearly resampled
    # (phantom-fm); resize: the whole slice stretched to size x size, no resampling to a spacing (Curia)
    geometry: Literal["fit", "resize"] = "fit"
    interpolation: Literal["linear", "bicubic_antialias"] = "linear"
    channels: int | None = Field(None, gt=0, description="input channels the backbone takes")
    intensity: IntensitySpec = IntensitySpec()

    @model_validator(mode="after")
    def _feedable(self) -> InputSpec:
        if self.kind == "patch3d":
            if self.volume is None:
                raise ValueError("patch3d needs volume (the network's axes, spacing and patch)")
            if self.intensity.kind not in VOLUME_INTENSITIES:
                raise ValueError(
                    f"patch3d: intensity {self.intensity.kind} is for 2D slices (dataset, volume_zscore or range)"
                )
            return self
        pairs = {("fit", "linear"), ("resize", "bicubic_antialias")}
        if (self.geometry, self.interpolation) not in pairs:
            raise ValueError(
                f"geometry {self.geometry} with interpolation {self.interpolation} is not supported "
                "(fit+linear or resize+bicubic_antialias)"
            )
        if self.channels is not None and self.channels != self.intensity.channels:
            raise ValueError(
                f"channels: the backbone takes {self.channels} channels but intensity {self.intensity.kind} "
                f"feeds {self.intensity.channels}"
            )
        return self


class BackboneSpec(_Strict):
    graph: str
    batch: int = Field(16, gt=0)
    outputs: tuple[str, ...] = ("tokens", "cls")


class ClassLabel(_Strict):
    """One output of a multi-class classification head (``id2label`` of a Hugging Face head)."""

    index: int = Field(ge=0)
    name: str
    code: Code
    negative: bool = Field(False, description="the class means no finding (not a positive result)")


class HeadSpec(_Strict):
    name: str
    kind: Literal["segmentation", "classification", "detection"]
    graph: str
    inputs: tuple[str, ...] = Field(description="backbone outputs and/or 'image'")
    labels: tuple[Label, ...] = ()
    # classification: what is evaluated and the coded answers: positive/negative for a one-output
    # head (its output is P(positive)), or one coded class per output of a softmax head
    finding: Code | None = None
    positive: Code | None = None
    negative: Code | None = None
    classes: tuple[ClassLabel, ...] = ()
    threshold: float = Field(0.5, gt=0, lt=1)
    calibration: Calibration | None = Field(None, description="classification: raw output -> stated probability")
    # what a classification head reads of each slice: ``cls`` / ``cls_meanpatch``, the CLS token (and
    # the mean patch token beside it, as transformers' Dinov2ForImageClassification), mean-pooled over
    # the series' slices into its one input ``features``; ``slices``, its ``inputs`` batch by batch,
    # one probability per slice, the series' being the highest. None: the graph takes ``inputs`` whole.
    reads: Literal["cls", "cls_meanpatch", "slices"] | None = None
    # a slice-wise lesion head: the segmentation head whose organs' ends it must not report as
    # lesions (node.model.organ_ends)
    organ_ends: str | None = None
    outputs: tuple[Literal["seg", "sr", "gsps"], ...] = ("seg", "sr", "gsps")
    # a learned head (node.model.head_versions): its version, named in every output it makes (None:
    # shipped with the model, whose version it has); shadow: computed on every series, never written
    version: str | None = None
    shadow: bool = False
    # patch3d: a network whose grid or normalisation differs from the model's input (TotalSegmentator's
    # parts each z-score with the statistics of their own labelled voxels)
    volume: Patch3DSpec | None = None
    intensity: IntensitySpec | None = None

    @model_validator(mode="after")
    def _check(self) -> HeadSpec:
        if self.kind == "segmentation" and not self.labels:
            raise ValueError(f"head {self.name}: a segmentation head needs labels")
        if self.kind == "classification":
            binary = self.positive and self.negative
            if not self.finding or not (binary or self.classes):
                raise ValueError(
                    f"head {self.name}: a classification head needs a finding and positive/negative or classes"
                )
            if self.classes and sorted(c.index for c in self.classes) != list(range(len(self.classes))):
                raise ValueError(f"head {self.name}: classes must be indexed 0..{len(self.classes) - 1}")
            if self.calibration and self.calibration.kind == "isotonic" and self.classes:
                raise ValueError(f"head {self.name}: isotonic calibration is for a one-output head")
            if self.pooled and set(self.inputs) != {"cls"} | (
                {"tokens"} if self.reads == "cls_meanpatch" else set()
            ):
                raise ValueError(f"head {self.name}: reads {self.reads} needs inputs {self._needs()}")
        return self

    def _needs(self) -> list[str]:
        return ["cls", "tokens"] if self.reads == "cls_meanpatch" else ["cls"]

    @property
    def pooled(self) -> bool:
        """The head reads one feature vector per series (the mean over its slices)."""
        return self.reads in ("cls", "cls_meanpatch")

    @property
    def graph_inputs(self) -> tuple[str, ...]:
        """The head graph's inputs: the pooled ``features`` of a head that reads a token, else ``inputs``."""
        return ("features",) if self.pooled else self.inputs


class ModelSpec(_Strict):
    name: str
    version: str
    description: str = ""
    modalities: tuple[str, ...]
    input: InputSpec
    # a 2D foundation model's backbone, computed once for every head; a 3D model (patch3d) has none:
    # each of its heads is a whole network from image to per-voxel logits
    backbone: BackboneSpec | None = None
    heads: tuple[HeadSpec, ...]
    path: Path = Field(Path("."), exclude=True)
    # the manifest's own version: ``version`` also names the learned heads' (2.0.0+aorta.3); the
    # backbone, and so its features, are this one's
    base_version: str = Field("", exclude=True)

    @model_validator(mode="after")
    def _parts(self) -> ModelSpec:
        if self.input.kind == "slice2d" and self.backbone is None:
            raise ValueError("a slice2d model needs a backbone")
        if self.input.kind == "patch3d":
            if self.backbone is not None:
                raise ValueError("a patch3d model has no backbone: each head is a whole network")
            for h in self.heads:
                if h.kind != "segmentation" or h.inputs != ("image",):
                    raise ValueError(f"head {h.name}: a patch3d head is a segmentation network on the image")
                if h.intensity and h.intensity.kind not in VOLUME_INTENSITIES:
                    raise ValueError(f"head {h.name}: intensity {h.intensity.kind} is for 2D slices")
        elif any(h.volume or h.intensity for h in self.heads):
            raise ValueError("a head's own volume or intensity is for patch3d models")
        segmenting = {h.name for h in self.heads if h.kind == "segmentation"}
        for h in self.heads:
            if h.organ_ends and (h.kind != "segmentation" or h.organ_ends not in segmenting - {h.name}):
                raise ValueError(
                    f"head {h.name}: organ_ends names {h.organ_ends!r}, not another segmentation head of this model"
                )
        return self

    def volume_of(self, head: HeadSpec) -> tuple[Patch3DSpec, IntensitySpec]:
        """A 3D head's grid and normalisation: its own, or the model's."""
        return head.volume or self.input.volume, head.intensity or self.input.intensity

    @property
    def graphs(self) -> list[str]:
        return [*([self.backbone.graph] if self.backbone else []), *(h.graph for h in self.heads)]

    def graph(self, name: str) -> Path:
        return self.path / name


def model_dir(name_or_path: str | Path) -> Path:
    """A model's folder: the path given when it holds a model.yaml, else that name in models/."""
    folder = Path(name_or_path)
    return folder if (folder / "model.yaml").exists() else MODELS_DIR / str(name_or_path)


def load_model(name_or_path: str | Path = DEFAULT_MODEL) -> ModelSpec:
    """Load a model by name (from the repository) or by folder path; ModelError if unusable."""
    folder = model_dir(name_or_path)
    manifest = folder / "model.yaml"
    if not manifest.exists():
        raise ModelError(f"model {name_or_path}: no model.yaml in {folder}")
    try:
        raw = yaml.safe_load(manifest.read_text())
    except yaml.YAMLError as e:  # its str() is several lines with a caret: say where, on one line
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ModelError(f"{manifest}:{where}: not valid YAML ({problem})") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{manifest}: not a valid manifest (a mapping of keys to values is expected)")
    try:
        base = str(raw.get("version"))
        learned, suffix = learned_entries(folder)
        if learned:
            clash = {h.get("name") for h in raw.get("heads") or ()} & {h["name"] for h in learned}
            if clash:
                raise ModelError(f"{manifest}: learned head {', '.join(sorted(clash))} has a shipped head's name")
            raw = {**raw, "heads": [*(raw.get("heads") or ()), *learned], "version": base + suffix}
        spec = ModelSpec(**raw, path=folder, base_version=base)
    except TypeError as e:
        raise ModelError(f"{manifest}: not a valid manifest ({e})") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ModelError(f"{manifest}: {where}: {first['msg']}") from None
    missing = [g for g in spec.graphs if not spec.graph(g).exists()]
    if missing:
        raise ModelError(f"model {spec.name}: missing graph file(s) {', '.join(missing)} in {folder}")
    return spec
