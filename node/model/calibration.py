"""A classification head's calibration: the probability the SR states is the calibrated one.

A network that is 95 % accurate but 99 % confident misleads its reader; a calibration map, fitted on
held-out data (:mod:`node.learn.calibration`), turns its raw output into a probability that means
what it says. Two maps, both monotone (they keep the ranking of series):

- ``temperature``: ``sigmoid(logit(p) / T)`` for one output, ``softmax(log(p) / T)`` for several;
  it never moves a probability across 0.5 nor changes which class wins;
- ``isotonic``: one output through a piecewise-linear, non-decreasing map ``x -> y``; it may move a
  probability across the head's threshold (that is what it corrects).

numpy only: applied at run time by :func:`node.model.inference.predict`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

_EPS = 1e-7


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["temperature", "isotonic"]
    temperature: float = Field(1.0, gt=0)
    x: tuple[float, ...] = Field((), description="isotonic: raw probabilities, increasing")
    y: tuple[float, ...] = Field((), description="isotonic: the calibrated probability at each x")
    # what fitting measured on held-out data (expected calibration error, 15 bins), for the card
    ece_before: float | None = None
    ece_after: float | None = None

    @model_validator(mode="after")
    def _map(self) -> Calibration:
        if self.kind == "isotonic":
            if len(self.x) < 2 or len(self.x) != len(self.y):
                raise ValueError("isotonic calibration needs x and y of the same length (2 or more)")
            if np.any(np.diff(self.x) < 0) or np.any(np.diff(self.y) < 0):
                raise ValueError("isotonic calibration: x and y must be non-decreasing")
        return self

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """Raw head output -> calibrated: (1,) P(positive), or (K,) one probability per class."""
        p = np.clip(np.asarray(probs, np.float64), _EPS, 1 - _EPS)
        if self.kind == "isotonic":
            if p.size != 1:
                raise ValueError("isotonic calibration is for a one-output head")
            return np.interp(p, self.x, self.y)
        if p.size == 1:
            return 1.0 / (1.0 + np.exp(-np.log(p / (1 - p)) / self.temperature))
        z = np.log(p) / self.temperature
        e = np.exp(z - z.max())
        return e / e.sum()
