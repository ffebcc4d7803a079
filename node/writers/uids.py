"""Deterministic identities of the node's output instances.

The same source series processed by the same model version must give the same
UIDs, so that a re-run replaces its earlier output in any PACS instead of
duplicating it. A new model version gives new UIDs: its output is a different
result and must not overwrite the old one silently.
"""

from __future__ import annotations

from pydicom.uid import generate_uid

import node
from node.identity import NODE_NAME, OutputKind

# Offsets added to (source SeriesNumber x 100) so that the outputs sort next to their source series.
_SERIES_NUMBER_OFFSET = {
    OutputKind.SEG: 91,
    OutputKind.SR: 92,
    OutputKind.GSPS: 93,
    OutputKind.PMAP: 94,
    OutputKind.OUTLINES: 95,
}
_SERIES_TITLE = {
    OutputKind.SEG: "AI segmentation",
    OutputKind.SR: "AI report",
    OutputKind.OUTLINES: "AI measurements",
    OutputKind.GSPS: "AI annotations",
    OutputKind.PMAP: "AI lesion probability",
}


def _require(value: str, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}.")
    return value


def output_uid(source_series_uid: str, model_name: str, model_version: str, kind: str) -> str:
    """A UID that depends only on the source series, the model (name, version) and ``kind``.

    ``kind`` names what the UID identifies, e.g. ``"seg-series"``, ``"seg-instance"``,
    ``"tracking-3"``.
    """
    parts = [
        _require(source_series_uid, "source_series_uid"),
        _require(model_name, "model_name"),
        _require(model_version, "model_version"),
        _require(kind, "kind"),
    ]
    # the prefix text keeps our UIDs apart from other users of generate_uid's entropy mode
    return generate_uid(entropy_srcs=[NODE_NAME, "output", *parts])


def tracking_uid(source_series_uid: str, model_name: str, model_version: str, segment_number: int) -> str:
    """The Tracking Unique Identifier a lesion gets in the series where it is first seen; shared by
    its SEG segment, SR group and GSPS outline, and kept by the same lesion in later series."""
    return output_uid(source_series_uid, model_name, model_version, f"tracking-{segment_number}")


def device_uid() -> str:
    """The node's own device UID (observer context of the SR, serial number of the equipment)."""
    return generate_uid(entropy_srcs=[NODE_NAME, "device"])


def software_versions(model_name: str, model_version: str) -> list[str]:
    return [f"{NODE_NAME} {node.__version__}", f"{model_name} {model_version}"]


def series_number(source_number: object, kind: str) -> int:
    """SeriesNumber of an output series: the source's number x 100 + a per-kind offset (91-95)."""
    if kind not in _SERIES_NUMBER_OFFSET:
        raise ValueError(f"kind must be one of {sorted(_SERIES_NUMBER_OFFSET)}, got {kind!r}.")
    try:
        base = int(source_number) if source_number not in (None, "") else 0
    except (TypeError, ValueError):
        base = 0
    number = max(base, 0) * 100 + _SERIES_NUMBER_OFFSET[kind]
    return number if number < 2**31 else _SERIES_NUMBER_OFFSET[kind]


def series_description(kind: str, model_name: str, model_version: str) -> str:
    """SeriesDescription of an output series, e.g. "AI segmentation (phantom-fm 1.0)" (LO: 64 chars)."""
    if kind not in _SERIES_TITLE:
        raise ValueError(f"kind must be one of {sorted(_SERIES_TITLE)}, got {kind!r}.")
    return f"{_SERIES_TITLE[kind]} ({model_name} {model_version})"[:64]


def instance_identity(
    source_series_uid: str, source_series_number: object, model_name: str, model_version: str, kind: str
) -> dict:
    """The series/instance/equipment keyword arguments every highdicom output constructor takes."""
    return {
        "series_instance_uid": output_uid(source_series_uid, model_name, model_version, f"{kind}-series"),
        "series_number": series_number(source_series_number, kind),
        "series_description": series_description(kind, model_name, model_version),
        "sop_instance_uid": output_uid(source_series_uid, model_name, model_version, f"{kind}-instance"),
        "instance_number": 1,
        "manufacturer": NODE_NAME,
        "manufacturer_model_name": NODE_NAME,
        "software_versions": software_versions(model_name, model_version),
        "device_serial_number": device_uid(),
    }
