"""Importers: a model in the format its owners hold -> a model folder the runtime loads by path.

``huggingface`` reads a Hugging Face DINOv2 / ViT folder (Curia) with its classification heads,
``nnunet`` nnU-Net v2 results folders (TotalSegmentator), ``monai_bundle`` a MONAI bundle. An
importer needs the model's framework (the ``import`` extra); running the imported model does not.
A failed import leaves nothing behind (:func:`staged_model_folder`).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from node.errors import ModelError


@contextmanager
def staged_model_folder(out: Path) -> Iterator[Path]:
    """The folder to write an import into: next to ``out``, moved into place only once the model
    it holds loads; on any failure it is removed and ``out`` is as it was."""
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out}: exists and is not empty (import into a new folder)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".import-{out.name}-", dir=out.parent))
    try:
        yield tmp
        from node.model.manifest import load_model

        load_model(tmp)  # what was written loads, or the import fails here
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
