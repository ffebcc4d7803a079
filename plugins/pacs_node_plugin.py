"""pacs-node's Orthanc plugin: stable series -> routing rules -> durable job; job REST routes.

Deliberately thin (stdlib + Orthanc's ``orthanc`` module + the stdlib-only
``node.service.queue``): it runs inside Orthanc's process, so it must never load a
model or do heavy work; the worker process does that. Its settings come from
the ``PacsNode`` section that ``pacs-node serve`` writes into Orthanc's config.
"""

import hashlib
import json
import logging
import re
import sys

import orthanc

_CFG = json.loads(orthanc.GetConfiguration()).get("PacsNode", {})
if _CFG.get("Src") and _CFG["Src"] not in sys.path:
    sys.path.insert(0, _CFG["Src"])

# the path above makes these importable
from node.analysis.urgency import TriageRules, request_points  # noqa: E402
from node.identity import NODE_NAME, ROUTED_MODALITIES, JobState, SkipRule  # noqa: E402
from node.service.queue import JobQueue, to_json  # noqa: E402

# Never processed, whatever the rules say: non-images and the node's own outputs (no loops).
NEVER_MODALITIES = {"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTRECORD", "REG", "DOC", "OT"}

log = logging.getLogger("pacs_node_plugin")
JOB_STATES = {s.value for s in JobState}
_queue = JobQueue(_CFG["Queue"])
_rules = _CFG.get("Routing") or [{"modalities": list(ROUTED_MODALITIES)}]
_max_attempts = int(_CFG.get("MaxAttempts", 3))
_triage = TriageRules.from_dict(_CFG.get("Triage") or {})


def _info(msg):
    orthanc.LogInfo("pacs-node: " + msg)


def _warn(msg):
    orthanc.LogWarning("pacs-node: " + msg)


def _get(uri):
    return json.loads(orthanc.RestApiGet(uri))


def _rule_matches(rule, tags, modality, n_instances):
    if modality not in [m.upper() for m in rule.get("modalities", ROUTED_MODALITIES)]:
        return False
    if n_instances < int(rule.get("min_instances", 1)):
        return False
    if rule.get("max_instances") and n_instances > int(rule["max_instances"]):
        return False
    if rule.get("sop_classes") and tags.get("SOPClassUID", "") not in rule["sop_classes"]:
        return False
    for key, pattern in (rule.get("tags") or {}).items():
        if not re.fullmatch(pattern, str(tags.get(key, "")), re.IGNORECASE):
            return False
    return not any(
        re.fullmatch(pattern, str(tags.get(key, "")), re.IGNORECASE)
        for key, pattern in (rule.get("exclude_tags") or {}).items()
    )


def _modality_label(modality):
    """A bounded, PHI-free label: a DICOM Modality (CS, <= 16 chars) or 'other'."""
    return modality if re.fullmatch(r"[A-Z0-9_ ]{1,16}", modality or "") else "other"


def decide(series_id):
    """Return (eligible, skip rule or None, reason, series info) for one stable series; the series
    info gains ``Priority``, the request's urgency points."""
    series = _get(f"/series/{series_id}")
    instances = sorted(series.get("Instances", []))
    tags = dict(series.get("MainDicomTags", {}))
    modality = str(tags.get("Modality", "")).upper()
    if modality in NEVER_MODALITIES:
        return False, SkipRule.EXCLUDED_MODALITY, f"{modality} series is never processed", series
    if not instances:
        return False, SkipRule.NO_INSTANCES, "no instances", series
    if str(tags.get("SeriesInstanceUID", "")) in _queue.retrieved:
        return False, SkipRule.RETRIEVED_PRIOR, "a prior the worker retrieved for comparison", series
    # SOP class and manufacturer are instance-level: read one instance's header
    first = _get(f"/instances/{instances[0]}/simplified-tags")
    for key in ("SOPClassUID", "Manufacturer", "BodyPartExamined", "ImageType", "ProtocolName"):
        tags.setdefault(key, first.get(key, ""))
    series["Priority"] = request_points(first, _triage)[0]  # the request's urgency orders the queue
    if str(first.get("Manufacturer", "")).strip() == NODE_NAME:
        return False, SkipRule.OWN_OUTPUT, "output of pacs-node", series
    if "Rows" not in first:
        return False, SkipRule.NOT_AN_IMAGE, "not an image", series
    for rule in _rules:
        if _rule_matches(rule, tags, modality, len(instances)):
            return True, None, "eligible", series
    return False, SkipRule.NO_RULE, "%s series matches no routing rule" % (modality or "unknown"), series


def on_change(change_type, level, resource_id):
    if change_type != orthanc.ChangeType.STABLE_SERIES:
        return
    try:
        eligible, skipped_by, reason, series = decide(resource_id)
        modality = str(series.get("MainDicomTags", {}).get("Modality", "")).upper()
        _queue.counters.record_series(_modality_label(modality), skipped_by)
        if not eligible:
            _info(f"series {resource_id} skipped: {reason}")
            return
        instances = sorted(series.get("Instances", []))
        fingerprint = hashlib.sha1("\n".join(instances).encode()).hexdigest()
        submitted = _queue.jobs.submit(
            resource_id,
            study_id=series.get("ParentStudy", ""),
            modality=series["MainDicomTags"].get("Modality", ""),
            instances=len(instances),
            fingerprint=fingerprint,
            max_attempts=_max_attempts,
            priority=int(series.get("Priority", 0)),
        )
        if submitted.job_id is None:
            _info(f"series {resource_id}: no new job ({submitted.reason})")
        else:
            _info(f"series {resource_id} -> job {submitted.job_id} ({submitted.reason})")
    except Exception as e:  # never let a plugin error disturb the DICOM receiver
        orthanc.LogError(f"pacs-node: series {resource_id}: could not queue: {type(e).__name__}: {e}")


def _answer(output, obj, status=200):
    body = to_json(obj)
    if status == 200:
        output.AnswerBuffer(body, "application/json")
    else:
        output.SendHttpStatus(status, body)


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
    jobs = [j.__dict__ for j in _queue.jobs.recent(state, limit)]
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
_info(f"plugin ready (queue {_CFG['Queue']}, {len(_rules)} routing rules)")
