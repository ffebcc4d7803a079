"""Tooling outside the service: ``bench`` (throughput and stage times), ``curia_shaped`` (a ViT-B/16
benchmark model), ``train_reference`` (training ``phantom-fm``), ``evaluate`` (held-out quality),
``render`` (a GSPS drawn over its image), the ``nnunet``, ``seg``, ``memory3d`` and ``queue``
benchmark suites. Nothing in ``node.service`` imports these.
"""

from __future__ import annotations

import multiprocessing
import resource


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports it in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_fresh_process(target, *args) -> dict:
    """``target(*args, queue)`` in a new interpreter (so its peak memory is its own): what it puts
    on the queue."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, q))
    proc.start()
    result = q.get(timeout=3600)
    proc.join()
    return result
