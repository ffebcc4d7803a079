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
    kind: Literal["organ", "lesion"] = "organ"
    instances: bool = Field(False, description="split into connected components, one segment each")


class IntensitySpec(_Strict):
    ct_windows: tuple[tuple[float, float], ...] = ((-1000.0, 1000.0), (-160.0, 240.0))
    mr_percentiles: tuple[float, float] = (1.0, 99.0)


class InputSpec(_Strict):
    kind: Literal["slice2d", "patch3d"] = "slice2d"
    size: int = Field(128, gt=0, description="in-plane pixels (2D) or patch edge (3D)")
    depth: int = Field(1, gt=0, description="slices per patch (3D only)")
    overlap: float = Field(0.0, ge=0, lt=1, description="sliding-window overlap (3D only)")
    orientation: Literal["axial"] = "axial"
    intensity: IntensitySpec = IntensitySpec()


class BackboneSpec(_Strict):
    graph: str
    batch: int = Field(16, gt=0)
    outputs: tuple[str, ...] = ("tokens", "cls")


class HeadSpec(_Strict):
    name: str
    kind: Literal["segmentation", "classification", "detection"]
    graph: str
    inputs: tuple[str, ...] = Field(description="backbone outputs and/or 'image'")
    labels: tuple[Label, ...] = ()
    # classification: what is evaluated and the coded answers
    finding: Code | None = None
    positive: Code | None = None
    negative: Code | None = None
    threshold: float = Field(0.5, gt=0, lt=1)
    outputs: tuple[Literal["seg", "sr", "gsps"], ...] = ("seg", "sr", "gsps")

    @model_validator(mode="after")
    def _check(self) -> HeadSpec:
        if self.kind == "segmentation" and not self.labels:
            raise ValueError(f"head {self.name}: a segmentation head needs labels")
        if self.kind == "classification" and not (self.finding and self.positive and self.negative):
            raise ValueError(f"head {self.name}: a classification head needs finding, positive and negative")
        return self


class ModelSpec(_Strict):
    name: str
    version: str
    description: str = ""
    modalities: tuple[str, ...]
    input: InputSpec
    backbone: BackboneSpec
    heads: tuple[HeadSpec, ...]
    path: Path = Field(Path("."), exclude=True)

    def graph(self, name: str) -> Path:
        return self.path / name


def load_model(name_or_path: str | Path = DEFAULT_MODEL) -> ModelSpec:
    """Load a model by name (from the repository) or by folder path; ModelError if unusable."""
    folder = Path(name_or_path)
    if not (folder / "model.yaml").exists():
        folder = MODELS_DIR / str(name_or_path)
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
        spec = ModelSpec(**raw, path=folder)
    except TypeError as e:
        raise ModelError(f"{manifest}: not a valid manifest ({e})") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ModelError(f"{manifest}: {where}: {first['msg']}") from None
    missing = [g for g in (spec.backbone.graph, *(h.graph for h in spec.heads)) if not spec.graph(g).exists()]
    if missing:
        raise ModelError(f"model {spec.name}: missing graph file(s) {', '.join(missing)} in {folder}")
    return spec
