"""Step 4: the DICOM objects of a :class:`~node.analysis.findings.Findings`, one module per IOD, via
highdicom: ``seg`` (DICOM SEG), ``sr`` (TID 1500 Comprehensive 3D SR), ``gsps`` (Grayscale Softcopy
Presentation State), ``pmap`` (the lesion probability Parametric Map). Every object takes its patient
and study modules from the source series and its deterministic UIDs from ``uids``.
"""
