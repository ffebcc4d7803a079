"""Routing rules: which series a rule sends to inference. Stdlib only: the Orthanc plugin decides
with it whether a stable series becomes a job (any model's rule), the worker which models run on it.

A rule is the JSON form of :class:`node.config.Rule`; ``tags`` maps DICOM keywords to the
series' values as strings (Orthanc's way: multiple values joined by a backslash).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from node.identity import ROUTED_MODALITIES


def rule_matches(rule: Mapping, tags: Mapping[str, str], modality: str, n_instances: int) -> bool:
    """Every condition ``rule`` gives holds; regular expressions match whole values, any case."""
    if modality.upper() not in [m.upper() for m in rule.get("modalities", ROUTED_MODALITIES)]:
        return False
    if n_instances < int(rule.get("min_instances") or 1):
        return False
    if rule.get("max_instances") and n_instances > int(rule["max_instances"]):
        return False
    if rule.get("sop_classes") and tags.get("SOPClassUID", "") not in rule["sop_classes"]:
        return False
    for key, pattern in (rule.get("tags") or {}).items():
        if not re.fullmatch(pattern, str(tags.get(key, "")), re.IGNORECASE):
            return False
    return not any(
        re.fullmatch(pattern, str(tags.get(key, "")), re.IGNORECASE)
        for key, pattern in (rule.get("exclude_tags") or {}).items()
    )


def header_tags(dataset, keys) -> dict[str, str]:
    """``keys`` of a pydicom header as Orthanc gives them to the plugin: strings, several values
    joined by a backslash, absent ones empty."""
    out = {}
    for key in keys:
        value = dataset.get(key, "")
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):  # pydicom's MultiValue
            value = "\\".join(str(v) for v in value)
        out[key] = "" if value is None else str(value)
    return out
