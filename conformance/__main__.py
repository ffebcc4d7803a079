"""``python -m conformance``: run the conformance suite (dciodvfy, pixelmed's SR validator, dcmqi's
readers, DCMTK interop and dcmp2pgm, SEG read-back, statement vs code, and OHIF in headless
Chromium on a study the node processed) and exit with its status."""

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.exit(
    pytest.main(
        ["-q", "-p", "no:cacheprovider", str(TESTS / "test_conformance.py"), str(TESTS / "test_viewer.py"), *sys.argv[1:]]
    )
)
