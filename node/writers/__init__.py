"""DICOM writers: SEG, TID 1500 SR, GSPS and the lesion probability Parametric Map of a
:class:`~node.findings.Findings`, via highdicom.

All of them take their patient/study modules from the source series and get
deterministic UIDs from :func:`node.writers.uids.output_uid`.
"""

from node.writers.gsps import write_gsps
from node.writers.pmap import write_probability_map
from node.writers.seg import write_seg
from node.writers.sr import write_sr
from node.writers.uids import output_uid

__all__ = ["output_uid", "write_gsps", "write_probability_map", "write_seg", "write_sr"]
