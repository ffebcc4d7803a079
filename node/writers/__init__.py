"""DICOM writers: SEG, TID 1500 SR and GSPS of a :class:`~node.findings.Findings`, via highdicom.

All three take their patient/study modules from the source series and get
deterministic UIDs from :func:`node.writers.uids.output_uid`.
"""

from node.writers.gsps import write_gsps
from node.writers.seg import write_seg
from node.writers.sr import write_sr
from node.writers.uids import output_uid

__all__ = ["output_uid", "write_gsps", "write_seg", "write_sr"]
