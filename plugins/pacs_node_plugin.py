"""pacs-node's Orthanc plugin: stable series -> routing rules -> durable job; job REST routes.

Deliberately thin (stdlib + Orthanc's ``orthanc`` module + the stdlib-only
``node.service.queue``): it runs inside Orthanc's process, so it must never load a
model or do heavy work; the worker process does that. Its settings come from
the ``PacsNode`` section that ``pacs-node serve`` writes into Orthanc's config.
"""

import dataclasses
import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
import threading
import time

import orthanc

_CFG = json.loads(orthanc.GetConfiguration()).get("PacsNode", {})
if _CFG.get("Src") and _CFG["Src"] not in sys.path:
    sys.path.insert(0, _CFG["Src"])

# the path above makes these importable
from node.analysis.urgency import TriageRules, request_points  # noqa: E402
from node.identity import NODE_NAME, ROUTED_MODALITIES, JobState, LabelKind, SkipRule  # noqa: E402
from node.service.queue import JobQueue, Label, to_json  # noqa: E402
from node.service.routing import rule_matches  # noqa: E402

# Never processed, whatever the rules say: non-images and the node's own outputs (no loops).
NEVER_MODALITIES = {"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTRECORD", "REG", "DOC", "OT"}

log = logging.getLogger("pacs_node_plugin")
JOB_STATES = {s.value for s in JobState}
_queue = JobQueue(_CFG["Queue"])
_STABLE_AGE = float(json.loads(orthanc.GetConfiguration()).get("StableAge", 60))
_rules = _CFG.get("Routing") or [{"modalities": list(ROUTED_MODALITIES)}]
_max_attempts = int(_CFG.get("MaxAttempts", 3))
_triage = TriageRules.from_dict(_CFG.get("Triage") or {})


def _info(msg):
    orthanc.LogInfo("pacs-node: " + msg)


def _warn(msg):
    orthanc.LogWarning("pacs-node: " + msg)


def _get(uri):
    return json.loads(orthanc.RestApiGet(uri))


def _modality_label(modality):
    """A bounded, PHI-free label: a DICOM Modality (CS, <= 16 chars) or 'other'."""
    return modality if re.fullmatch(r"[A-Z0-9_ ]{1,16}", modality or "") else "other"


def decide(series):
    """Return (eligible, skip rule or None, reason) for one stable series (Orthanc's /series/{id});
    the series gains ``Priority``, the request's urgency points."""
    instances = sorted(series.get("Instances", []))
    tags = dict(series.get("MainDicomTags", {}))
    modality = str(tags.get("Modality", "")).upper()
    if modality in NEVER_MODALITIES:
        return False, SkipRule.EXCLUDED_MODALITY, f"{modality} series is never processed"
    if not instances:
        return False, SkipRule.NO_INSTANCES, "no instances"
    if str(tags.get("SeriesInstanceUID", "")) in _queue.retrieved:
        return False, SkipRule.RETRIEVED_PRIOR, "a prior the worker retrieved for comparison"
    # SOP class and manufacturer are instance-level: read one instance's header
    first = _get(f"/instances/{instances[0]}/simplified-tags")
    for key in ("SOPClassUID", "Manufacturer", "BodyPartExamined", "ImageType", "ProtocolName"):
        tags.setdefault(key, first.get(key, ""))
    series["Priority"] = request_points(first, _triage)[0]  # the request's urgency orders the queue
    if str(first.get("Manufacturer", "")).strip() == NODE_NAME:
        return False, SkipRule.OWN_OUTPUT, "output of pacs-node"
    if "Rows" not in first:
        return False, SkipRule.NOT_AN_IMAGE, "not an image"
    for rule in _rules:
        if rule_matches(rule, tags, modality, len(instances)):
            return True, None, "eligible"
    return False, SkipRule.NO_RULE, "%s series matches no routing rule" % (modality or "unknown")


def label_sets_of(instances):
    """The label sets a SEG series holds: each instance a viewer wrote (not the node) about a series
    here, as ``Labels.add`` arguments: (series UID, kind, SOP Instance UID, calling AE, labels)."""
    found = []
    for instance in instances:
        tags = _get(f"/instances/{instance}/tags?simplify")
        if str(tags.get("Manufacturer", "")).strip() == NODE_NAME:
            return []  # our own SEG sent back: not a radiologist's labels
        here = [
            uid
            for uid in (r.get("SeriesInstanceUID") for r in tags.get("ReferencedSeriesSequence") or [])
            if uid and any(x.get("Type") == "Series" for x in json.loads(orthanc.RestApiPost("/tools/lookup", uid)))
        ]
        if not here:
            _info(f"instance {instance}: a SEG of no series here: not a label set")
            continue
        try:
            sender = orthanc.RestApiGet(f"/instances/{instance}/metadata/RemoteAET").decode().strip()
        except Exception:  # sent by STOW-RS or the REST API: no calling AE
            sender = ""
        labels = [
            Label(str(seg.get("SegmentLabel", "")), _code(seg.get("SegmentedPropertyTypeCodeSequence")))
            for seg in tags.get("SegmentSequence") or []
        ]
        found.append((here[0], LabelKind.SEGMENTATION, str(tags.get("SOPInstanceUID", instance)), sender, labels))
    return found


def _code(sequence):
    """'SCT:10200004' of a simplified code sequence, or ''."""
    item = (sequence or [{}])[0]
    return f"{item['CodingSchemeDesignator']}:{item['CodeValue']}" if item.get("CodeValue") else ""


def handle(series_id, picked_up=False):
    """One stable series -> a job, or a skip with its rule (one transaction, counted with it).

    ``picked_up``: found by a pick-up (at start, or the periodic one) rather than by its stable
    event; a series already decided for exactly these instances, or still receiving, is left alone."""
    try:
        series = _get(f"/series/{series_id}")
    except Exception:  # deleted meanwhile
        return
    instances = sorted(series.get("Instances", []))
    fingerprint = hashlib.sha1("\n".join(instances).encode()).hexdigest()
    if picked_up and (not series.get("IsStable", True) or _queue.intake.decided(series_id, fingerprint)):
        return
    tags = series.get("MainDicomTags", {})
    modality = str(tags.get("Modality", "")).upper()
    eligible, skipped_by, reason = decide(series)
    how = "picked up" if picked_up else "stable"
    if not eligible:
        label_sets = label_sets_of(instances) if modality == "SEG" else []
        if label_sets:
            skipped_by, reason = SkipRule.LABEL_SET, f"{len(label_sets)} label set(s), never a job"
        _queue.intake.skip(series_id, fingerprint, _modality_label(modality), skipped_by, label_sets)
        _info(f"series {series_id} ({how}) skipped: {reason}")
        return
    submitted = _queue.intake.accept(
        series_id,
        fingerprint,
        _modality_label(modality),
        study_id=series.get("ParentStudy", ""),
        modality=tags.get("Modality", ""),
        instances=len(instances),
        max_attempts=_max_attempts,
        priority=int(series.get("Priority", 0)),
    )
    if submitted.job_id is None:
        _info(f"series {series_id} ({how}): no new job ({submitted.reason})")
    elif picked_up:
        _warn(f"series {series_id} had no job (its stable event was lost): job {submitted.job_id}")
    else:
        _info(f"series {series_id} -> job {submitted.job_id} ({submitted.reason})")


_pick_up_lock = threading.Lock()  # the start's pick-up and the periodic one read and move one place
# how often the change log is read again while running: a stable event can be lost without a restart
# (Orthanc cannot log it while its PostgreSQL index is restarting, and then never calls us with it)
PICK_UP_EVERY_S = max(30.0, 3 * _STABLE_AGE)


def pick_up(when="at start"):
    """Every series Orthanc received since the last pick-up, from its change log (durable in its
    index), that has neither a job nor a skip for its instances gets one now. At every start, and
    every ``PICK_UP_EVERY_S`` while running (then it logs only what it found)."""
    with _pick_up_lock:
        _pick_up(when)


def _pick_up(when):
    since = _queue.intake.change_seq()
    touched = {}  # series ID -> None, in order of first change
    while True:
        page = _get(f"/changes?since={since}&limit=1000")
        for change in page["Changes"]:
            kind = change["ChangeType"]
            if kind in ("NewSeries", "StableSeries"):
                touched[change["ID"]] = None
            elif kind == "NewInstance":  # late instances of a series decided before
                try:
                    touched[_get(f"/instances/{change['ID']}")["ParentSeries"]] = None
                except Exception:  # deleted meanwhile
                    continue
        since = page["Last"]
        if page["Done"] or not page["Changes"]:
            break
    settled, growing = _settled(list(touched))
    failed = len(growing)  # still growing: left to their stable event, and read again next start
    for series_id in settled:
        try:
            handle(series_id, picked_up=True)
        except Exception as e:  # one bad series must not stop the others
            failed += 1
            orthanc.LogError(f"pacs-node: pick-up of series {series_id}: {type(e).__name__}: {e}")
    if not failed:  # else the next pick-up reads the same changes again (decided series are left alone)
        _queue.intake.set_change_seq(since)
    if when == "at start" or failed:
        _info(f"pick-up {when}: {len(touched)} series in the change log up to {since}, {failed} not taken yet")


def _pick_up_every():
    """The periodic pick-up, in a thread of its own: a failure is a line, and the next round tries again."""
    while True:
        time.sleep(PICK_UP_EVERY_S)
        try:
            pick_up("periodic")
        except Exception as e:  # the queue or Orthanc's index restarting: the next round reads the same changes
            _warn(f"periodic pick-up: {type(e).__name__}: {' '.join(str(e).split())[:200]}")


def _fingerprint(series_id):
    """(instances' hash, stable here) of a series, or None when it is gone."""
    try:
        series = _get(f"/series/{series_id}")
    except Exception:
        return None
    instances = sorted(series.get("Instances", []))
    return hashlib.sha1("\n".join(instances).encode()).hexdigest(), series.get("IsStable", True)


def _settled(series_ids):
    """(the series that stopped changing, in the order given; those still growing). On a shared index another
    receiver may still be receiving a series that looks stable here (stability is each Orthanc's
    own): an undecided one is looked at again after one stable age, and taken only if unchanged."""
    seen = {sid: _fingerprint(sid) for sid in series_ids}
    waiting = [
        sid for sid, fp in seen.items() if fp and fp[1] and not _queue.intake.decided(sid, fp[0])
    ]
    for _ in range(10):  # a series still growing after ten stable ages is left to its stable event
        if not waiting:
            break
        time.sleep(_STABLE_AGE)
        now = {sid: _fingerprint(sid) for sid in waiting}
        waiting = [sid for sid in waiting if now[sid] != seen[sid]]
        seen.update(now)
    return [sid for sid in series_ids if sid not in waiting], waiting


def on_change(change_type, level, resource_id):
    try:
        if change_type == orthanc.ChangeType.STABLE_SERIES:
            handle(resource_id)
        elif change_type == orthanc.ChangeType.ORTHANC_STARTED:
            threading.Thread(target=_pick_up_every, name="pick-up", daemon=True).start()
            pick_up()  # in Orthanc's change thread: the receiver is already up, stable events wait
    except _queue.errors as e:  # the queue unreachable (PostgreSQL restarting, a full disk): again later
        if change_type == orthanc.ChangeType.STABLE_SERIES:
            _queue_later(resource_id, f"{type(e).__name__}: {e}")
        else:
            orthanc.LogError(f"pacs-node: pick-up: queue unreachable: {type(e).__name__}: {e}")
    except Exception as e:  # never let a plugin error disturb the DICOM receiver
        orthanc.LogError(f"pacs-node: series {resource_id}: could not queue: {type(e).__name__}: {e}")


def _queue_later(series_id, why, delay=1.0):
    """A stable series the queue could not take: tried again, 1, 2, 4 ... 60 s apart, until the queue
    answers (its stable event does not come twice; without this it would wait for the next start)."""
    _warn(f"series {series_id}: queue unreachable ({why.splitlines()[0]}): trying again in {delay:g} s")

    def again():
        try:
            handle(series_id)
        except _queue.errors as e:
            _queue_later(series_id, f"{type(e).__name__}: {e}", min(delay * 2, 60.0))
        except Exception as e:
            orthanc.LogError(f"pacs-node: series {series_id}: could not queue: {type(e).__name__}: {e}")

    timer = threading.Timer(delay, again)
    timer.daemon = True
    timer.start()


class Watermarks:
    """Refuse new instances while the data folder's file system is fuller than ``high`` percent;
    accept again below ``low`` (hysteresis, so intake does not flap at the edge)."""

    def __init__(self, cfg):
        self.path = cfg.get("Path") or "."
        self.high = float(cfg.get("High", 90))
        self.low = float(cfg.get("Low", 85))
        self.accepting = True
        self.reason = ""
        self.refused = 0
        self.used = 0.0

    def check(self):
        usage = shutil.disk_usage(self.path)
        self.used = 100.0 * (usage.total - usage.free) / usage.total
        if self.accepting and self.used >= self.high:
            self.accepting = False
            self.reason = f"data folder's file system {self.used:.1f}% full (high watermark {self.high:g}%)"
            _warn(f"refusing new instances: {self.reason}")
        elif not self.accepting and self.used < self.low:
            self.accepting = True
            _warn(f"accepting instances again: {self.used:.1f}% full (low watermark {self.low:g}%)")
            self.reason = ""
        return self.accepting

    def state(self):
        self.check()
        return {
            "accepting": self.accepting,
            "reason": self.reason,
            "used_percent": round(self.used, 2),
            "high_watermark_percent": self.high,
            "low_watermark_percent": self.low,
            "refused_since_start": self.refused,
        }


_watermarks = Watermarks(_CFG.get("Watermarks") or {})
OUT_OF_RESOURCES = 0xA700  # C-STORE "Refused: Out of Resources"


def filter_cstore(received):
    """Before Orthanc stores a C-STORE instance: refuse it, with a status, above the watermark."""
    try:
        if _watermarks.check():
            return 0
    except Exception as e:  # a failing check must not refuse (or crash) the receiver
        orthanc.LogError(f"pacs-node: disk check failed: {type(e).__name__}: {e}")
        return 0
    _watermarks.refused += 1
    return OUT_OF_RESOURCES


def filter_http(uri, **request):
    """STOW-RS is refused (403) above the watermark like C-STORE; everything else passes (the worker
    stores its results through the REST API, and deliveries go on)."""
    if not uri.startswith("/dicom-web/studies") or str(request.get("method")) not in ("POST", "2"):
        return True
    try:
        if _watermarks.check():
            return True
    except Exception:
        return True
    _watermarks.refused += 1
    return False


def _answer(output, obj, status=200):
    body = to_json(obj)
    if status == 200:
        output.AnswerBuffer(body, "application/json")
    else:
        output.SendHttpStatus(status, body, len(body))


def rest_jobs(output, uri, **request):
    if request["method"] != "GET":
        output.SendMethodNotAllowed("GET")
        return
    args = request.get("get", {})
    state = args.get("state") or None
    if state is not None and state not in JOB_STATES:
        _answer(output, {"error": f"unknown state {state!r}", "states": sorted(JOB_STATES)}, 400)
        return
    limit = int(args.get("limit", "100")) if str(args.get("limit", "100")).isdigit() else 100
    jobs = [dataclasses.asdict(j) for j in _queue.jobs.recent(state, limit)]
    _answer(output, jobs)


def rest_job(output, uri, **request):
    if request["method"] != "GET":
        output.SendMethodNotAllowed("GET")
        return
    job = _queue.jobs.describe(int(request["groups"][0]))
    if job is None:
        _answer(output, {"error": "no such job"}, 404)
    else:
        _answer(output, job)


def rest_retry(output, uri, **request):
    if request["method"] != "POST":
        output.SendMethodNotAllowed("POST")
        return
    job_id = int(request["groups"][0])
    try:
        state = _queue.jobs.retry(job_id)
    except KeyError:
        _answer(output, {"error": "no such job"}, 404)
        return
    except ValueError as e:
        _answer(output, {"error": str(e)}, 409)
        return
    _warn(f"job {job_id} retried by operator")
    _answer(output, {"id": job_id, "state": state})


def rest_intake(output, uri, **request):
    if request["method"] != "GET":
        output.SendMethodNotAllowed("GET")
        return
    _answer(output, _watermarks.state())


def rest_labels(output, uri, **request):
    """The label sets (``?series=UID``: that series'), newest last."""
    if request["method"] != "GET":
        output.SendMethodNotAllowed("GET")
        return
    series = (request.get("get") or {}).get("series")
    _answer(output, [s.as_json() for s in _queue.labels.list(series)])


def _heads(*args, timeout=900):
    """``pacs-node heads ARGS`` as the node's own Python runs it: (exit status, its answer's last line:
    stdout's, or its one-line error; the warnings it logs are not the answer)."""
    cfg = _CFG.get("Heads") or {}
    if not cfg.get("Command"):
        return 2, "this node's Orthanc configuration has no PacsNode.Heads (restart pacs-node serve)"
    command = [*cfg["Command"], *args]
    if cfg.get("Config") and args[0] == "activate":
        command += ["--config", cfg["Config"]]
    try:
        r = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 2, f"pacs-node heads {args[0]} did not answer within {timeout} s"
    except OSError as e:
        return 2, f"pacs-node heads {args[0]}: {e}"
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    lines = r.stdout.strip().splitlines()
    return r.returncode, errors[-1] if errors else lines[-1] if lines else ""


def rest_heads(output, uri, **request):
    """Each model's learned heads: versions, cross-validated Dice, the active and the shadow version."""
    if request["method"] != "GET":
        output.SendMethodNotAllowed("GET")
        return
    found = []
    for model, folder in ((_CFG.get("Heads") or {}).get("Models") or {}).items():
        code, line = _heads("status", "--model", folder, "--json", timeout=60)
        found.append({"model": model, "heads": json.loads(line) if code == 0 else [], "error": None if code == 0 else line})
    _answer(output, found)


def rest_head_action(output, uri, **request):
    """POST /inference/heads/<head>/activate|shadow|rollback, body {"version": "2", "model": "..."}
    (model: needed only where several are configured): what ``pacs-node heads`` answers, on one line."""
    if request["method"] != "POST":
        output.SendMethodNotAllowed("POST")
        return
    head, action = request["groups"]
    try:
        body = json.loads(request.get("body") or b"{}") or {}
    except ValueError:
        _answer(output, {"error": "the body is not JSON"}, 400)
        return
    models = (_CFG.get("Heads") or {}).get("Models") or {}
    model = body.get("model") or (next(iter(models)) if len(models) == 1 else None)
    if model not in models:
        _answer(output, {"error": f"name the model: one of {', '.join(models)}"}, 400)
        return
    version = [str(body["version"])] if body.get("version") is not None and action != "rollback" else []
    if action == "activate" and not version:
        _answer(output, {"error": "activate needs a version"}, 400)
        return
    code, line = _heads(action, head, *version, "--model", models[model])
    _warn(f"head {head} of model {model}: {action} {' '.join(version)} by operator: {line}")
    _answer(output, {"ok": code == 0, "message": line}, 200 if code == 0 else 409)


def rest_destinations(output, uri, **request):
    if request["method"] != "GET":
        output.SendMethodNotAllowed("GET")
        return
    _answer(output, _queue.outbox.status())


orthanc.RegisterOnChangeCallback(on_change)
orthanc.RegisterRestCallback("/inference/jobs", rest_jobs)
orthanc.RegisterRestCallback("/inference/jobs/([0-9]+)", rest_job)
orthanc.RegisterRestCallback("/inference/jobs/([0-9]+)/retry", rest_retry)
orthanc.RegisterRestCallback("/inference/destinations", rest_destinations)
orthanc.RegisterRestCallback("/inference/intake", rest_intake)
orthanc.RegisterRestCallback("/inference/labels", rest_labels)
orthanc.RegisterRestCallback("/inference/heads", rest_heads)
orthanc.RegisterRestCallback("/inference/heads/([^/]+)/(activate|shadow|rollback)", rest_head_action)
orthanc.RegisterIncomingCStoreInstanceFilter(filter_cstore)
orthanc.RegisterIncomingHttpRequestFilter(filter_http)
_info(f"plugin ready (queue {_CFG['Queue']}, {len(_rules)} routing rules)")
