"""The DICOM Conformance Statement (``statement.md``) and the suite that keeps it true.

Run the suite with ``python -m conformance`` (``tests/test_conformance.py`` and
``tests/test_viewer.py``, also part of the normal test run). This module reads the statement's machine-checked tables and values.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
STATEMENT = HERE / "statement.md"
PLUGIN = HERE.parent / "plugins" / "pacs_node_plugin.py"


def table(name: str, text: str | None = None) -> list[dict[str, str]]:
    """The markdown table after ``<!-- table: name -->``: one dict per row, cells stripped of backticks."""
    text = STATEMENT.read_text() if text is None else text
    m = re.search(rf"<!-- table: {re.escape(name)} -->\n((?:\|.*\n)+)", text)
    if not m:
        raise KeyError(f"statement.md: no table {name!r}")
    lines = [ln.strip() for ln in m.group(1).splitlines()]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for ln in lines[2:]:
        cells = [c.strip().replace("`", "") for c in ln.strip("|").split("|")]
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def value(name: str) -> str:
    m = re.search(rf"<!-- value: {re.escape(name)} -->`([^`]*)`<!-- /value -->", STATEMENT.read_text())
    if not m:
        raise KeyError(f"statement.md: no value {name!r}")
    return m.group(1)


def listed(name: str) -> list[str]:
    m = re.search(rf"<!-- list: {re.escape(name)} -->(.*?)<!-- /list -->", STATEMENT.read_text(), re.S)
    if not m:
        raise KeyError(f"statement.md: no list {name!r}")
    return re.findall(r"`([^`]+)`", m.group(1))


def plugin_constant(name: str):
    """A literal constant of the Orthanc plugin (it imports ``orthanc``, so it is read, not imported)."""
    for node in ast.parse(PLUGIN.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise KeyError(f"{PLUGIN.name}: no constant {name}")
