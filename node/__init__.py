"""pacs-node: a PACS inference node (CT/MR in, DICOM SEG + TID 1500 SR + GSPS out)."""

__version__ = "0.1.0"
