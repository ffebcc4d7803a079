"""``python -m conformance``: run the conformance suite (dciodvfy, DCMTK interop, SEG read-back,
statement vs code) and exit with its status."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.exit(
    pytest.main(["-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_conformance.py"), *sys.argv[1:]])
)
