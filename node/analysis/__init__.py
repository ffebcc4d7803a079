"""Step 3: what the model's output means. ``postprocess`` turns a prediction into
:class:`~node.analysis.findings.Findings` (organs, lesions, classifications) measured by
``measure``; ``longitudinal`` compares with a prior (``registration`` when the frames differ);
``report_text`` checks the study's report against the image; ``urgency`` scores triage.
Stdlib-only modules here (``urgency``) are also read by the Orthanc plugin.
"""
