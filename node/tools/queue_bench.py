"""``pacs-node bench --suite queue``: what the queue itself sustains, SQLite against PostgreSQL.

N worker processes lease and complete jobs with nothing to infer (a no-op runtime: the job is
done as soon as it is leased), so the figure is the queue's ceiling, not the node's: jobs per
second for 1, 4 and 16 workers (the median of three runs), and each lease's latency (p50, p95).
Both backends are measured in the same run on the same machine; PostgreSQL when ``--queue-url``
names a database (its tables are emptied first: use a scratch database).
"""

from __future__ import annotations

import json
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np

from node.service.queue import JobQueue

TABLES = ("jobs", "history", "outputs", "deliveries", "counters")


def _worker(location: str, owner: str, start, out) -> None:
    q = JobQueue(location)
    latencies = []
    start.wait()
    while True:
        t0 = time.perf_counter()
        job = q.jobs.lease(owner, 60)
        latencies.append(time.perf_counter() - t0)
        if job is None:
            break
        q.jobs.complete(job.id, owner, [], [])
    out.put(latencies[:-1])


def empty(location: str) -> JobQueue:
    """A scratch queue, emptied."""
    q = JobQueue(location)
    with q.store.tx() as db:
        for table in TABLES:
            db.execute(f"DELETE FROM {table}")
    return q


def run(location: str, workers: int, jobs: int) -> dict:
    """``jobs`` queued, then ``workers`` processes drain them; wall time from their common start."""
    q = empty(location)
    for i in range(jobs):
        q.jobs.submit(f"bench-{i}", fingerprint=str(i))
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(location, f"bench{k}", start, out)) for k in range(workers)]
    for p in procs:
        p.start()
    time.sleep(1.0)  # every process connected and waiting
    t0 = time.perf_counter()
    start.set()
    latencies = [x for _ in procs for x in out.get(timeout=600)]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    done = sum(1 for j in q.jobs.recent(limit=jobs) if j.state == "done")
    ms = np.asarray(latencies) * 1000
    return {
        "workers": workers,
        "jobs": done,
        "jobs_per_s": round(done / wall, 1),
        "lease_ms_p50": round(float(np.percentile(ms, 50)), 2),
        "lease_ms_p95": round(float(np.percentile(ms, 95)), 2),
    }


def median_run(location: str, workers: int, jobs: int, repeat: int = 3) -> dict:
    """The run of median throughput among ``repeat`` (machines are shared and noisy)."""
    runs = sorted((run(location, workers, jobs) for _ in range(repeat)), key=lambda r: r["jobs_per_s"])
    return {**runs[len(runs) // 2], "repeats": repeat}


def bench_queue(url: str | None, workers: list[int], jobs: int, output: Path | None) -> int:
    results = {}
    with tempfile.TemporaryDirectory(prefix="pacs-node-queue-bench-") as tmp:
        backends = {"sqlite": str(Path(tmp) / "queue.sqlite")}
        if url:
            backends["postgresql"] = url
        else:
            print("PostgreSQL not measured: give --queue-url postgresql://... (a scratch database)")
        for name, location in backends.items():
            results[name] = [median_run(location, n, jobs) for n in workers]
    print(f"{'backend':<11} {'workers':>7} {'jobs/s':>8} {'lease p50 ms':>13} {'lease p95 ms':>13}")
    for name, rows in results.items():
        for r in rows:
            print(
                f"{name:<11} {r['workers']:>7} {r['jobs_per_s']:>8} {r['lease_ms_p50']:>13} {r['lease_ms_p95']:>13}"
            )
    if output:
        output.write_text(json.dumps(results, indent=1))
    return 0
