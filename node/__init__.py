"""pacs-node: a PACS inference node (CT/MR in; DICOM SEG, TID 1500 SR, GSPS and a lesion probability Parametric Map out).

The package is cut by the steps of the data's way: ingest, model, analysis, writers, pipeline, service; see
the README's architecture section.
"""

__version__ = "0.1.0"
