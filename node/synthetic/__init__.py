"""Synthetic CT and MR phantoms with known ground truth (``phantom``) written as DICOM in every
storage variant (``dicom``). Used by tests, the demo, training and the precision gate's
calibration set; never on a job's path.
"""
