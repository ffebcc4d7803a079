"""The delivery thread: send what the outbox says is due, per destination, and record each outcome.

Runs beside inference in the worker process (its own queue connection), so a slow or absent
destination never holds back inference and vice versa. Retries, backoff and the job's final state
are the outbox's (:mod:`node.service.queue.outbox`); how to send is egress's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict

from node.config import NodeConfig
from node.identity import Stage
from node.service import egress
from node.service.metrics import NodeMetrics
from node.service.orthanc import OrthancClient, OrthancError
from node.service.queue import Delivery, JobQueue

log = logging.getLogger(__name__)


class Deliverer:
    def __init__(self, cfg: NodeConfig, orthanc: OrthancClient, metrics: NodeMetrics):
        self.cfg, self.orthanc, self.metrics = cfg, orthanc, metrics
        # outcomes not yet written to the queue (its database restarting when they came back):
        # (destination, outcome, final: a failure no retry can mend)
        self._unrecorded: list[tuple[str, egress.Outcome, bool]] = []

    def loop(self, stop: threading.Event) -> None:
        """Until ``stop``: deliver what is due, then wait for more: until a NOTIFY says some became due
        (PostgreSQL) or a second passes (a retry's backoff ends by the clock, not by a notification)."""
        queue = JobQueue(self.cfg.queue_location)  # its own connection: not shared between threads
        while not stop.is_set():
            try:
                n = self.deliver_due(queue)
            except queue.errors as e:  # the queue unreachable or unwritable: one line, try again
                log.error("delivery: queue %s: %s", queue.path, str(e).strip().splitlines()[0])
                self.metrics.errors.labels("queue").inc()
                n = 0
            except Exception:
                log.exception("delivery loop error")
                self.metrics.errors.labels("delivery").inc()
                n = 0
            if not n:
                queue.wait_for_deliveries(min(self.cfg.worker.poll_s, 1.0))

    def deliver_due(self, queue: JobQueue) -> int:
        """Try every due delivery once, grouped per destination; return how many were tried."""
        self._record(queue)  # first what was sent while the queue could not be written
        due = queue.outbox.claim()  # taken: another worker's deliverer does not send these too
        by_dest: dict[str, list[Delivery]] = defaultdict(list)
        for d in due:
            by_dest[d.destination].append(d)
        for name, deliveries in by_dest.items():
            self._send(name, deliveries)
        self._record(queue)
        return len(due)

    def _send(self, name: str, deliveries: list[Delivery]) -> None:
        """Send to one destination; the outcomes wait in ``_unrecorded`` for :meth:`_record`."""
        try:
            dest = self.cfg.destination(name)
        except KeyError:  # removed from the config since: nothing will ever deliver it
            gone = f"destination {name!r} is no longer configured"
            self._unrecorded += [(name, egress.Outcome(d.id, gone), True) for d in deliveries]
            return
        items = []
        for d in deliveries:
            if not d.kind.is_dicom:  # a notification: its body is in the queue, nothing in Orthanc
                items.append(egress.Item(d.id, d.payload.encode()))
                continue
            try:
                items.append(egress.Item(d.id, self.orthanc.instance_file(d.orthanc_id)))
            except OrthancError as e:
                self._unrecorded.append((name, egress.Outcome(d.id, str(e)), False))
        t_send = time.monotonic()
        outcomes = egress.send(dest, items, self.cfg.ae_title)
        if items:
            self.metrics.observe_stage(Stage.DELIVER, time.monotonic() - t_send)
        log.info("delivered to %s: %d of %d", name, sum(o.error is None for o in outcomes), len(deliveries))
        self._unrecorded += [(name, o, False) for o in outcomes]

    def _record(self, queue: JobQueue) -> None:
        """Write each send's outcome into the queue. One the queue cannot take now (its database
        restarting) stays here and is written first next round, within the claim's hold
        (``outbox.CLAIM_S``), so no other deliverer sends it again: exactly once survives a
        database restart, though not this process dying in that window."""
        retry = self.cfg.delivery
        while self._unrecorded:
            name, o, final = self._unrecorded[0]
            if o.error is None:
                queue.outbox.delivered(o.key)
            else:
                attempts = 1 if final else retry.max_attempts
                state = queue.outbox.failed(o.key, o.error, retry.backoff_s, retry.backoff_max_s, attempts)
                log.warning("delivery %d to %s: %s (%s)", o.key, name, o.error, state)
            self._unrecorded.pop(0)
