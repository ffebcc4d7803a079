"""Learning from the department: label sets -> features -> light heads on the frozen backbone, calibrated,
versioned, gated."""
