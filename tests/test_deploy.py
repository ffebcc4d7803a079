"""deploy/ and compose.yaml: alert rules (promtool), the dashboard's metric names, the Compose file.

No Docker engine runs here: compose.yaml is validated against the Compose specification's JSON schema
(vendored in deploy/compose-spec/, Apache-2.0) plus the checks a schema cannot make (files exist,
GPU reserved, volumes persistent, no secret in the repo).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from node.config import parse_config
from node.service.metrics import NodeMetrics, SupervisorMetrics, exported_names

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "pacs-node.json"
COMPOSE = ROOT / "compose.yaml"
CLUSTER = ROOT / "compose.cluster.yaml"
# Orthanc's own metrics the dashboard uses; test_metrics checks them against a live Orthanc
ORTHANC_METRICS_USED = {"orthanc_count_instances", "orthanc_count_series", "orthanc_disk_size_mb"}
PROMETHEUS_BUILTIN = {"up"}
PROMQL_WORDS = {
    "sum", "by", "rate", "increase", "histogram_quantile", "and", "or", "on", "offset", "clamp_min",
    "absent", "le", "without", "max", "min", "avg", "count", "unless", "ignoring", "group_left",
}  # fmt: skip

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    not promtool, reason="promtool not installed (apt-get install prometheus)"
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (identifiers not inside {...}, strings or [...])."""
    expr = re.sub(r'"[^"]*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\bby\s*\([^)]*\)|\bon\s*\([^)]*\)", "", expr)
    names = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", expr))
    return {n for n in names if n not in PROMQL_WORDS and not re.fullmatch(r"\d+\w*|[smhdw]", n)}


def exported() -> set[str]:
    """What the worker and pacs-node serve's supervisor export (the supervisor's endpoint has both)."""
    supervisor = SupervisorMetrics(":memory:", [], list, lambda: None, ".", ["http://127.0.0.1:9"])
    return (
        exported_names(NodeMetrics().registry)
        | exported_names(NodeMetrics(queue_location=":memory:").registry)
        | exported_names(supervisor.registry)
    )


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict):
            exprs.append(re.sub(r"label_values\((\w+).*\)", r"\1", q["query"]))
    return exprs


# --- alerts -------------------------------------------------------------------------------------
@needs_promtool
def test_alert_rules_pass_promtool() -> None:
    r = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # and they fire on their stories (stuck queue, failing deliveries, worker down, rising failures)
    r = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ALERTS.parent,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_alerts_cover_the_issue_and_use_real_metrics() -> None:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {
        "PacsNodeQueueStuck",
        "PacsNodeDeliveriesFailing",
        "PacsNodeWorkerDown",
        "PacsNodeFailureRateRising",
    } <= names
    known = exported() | PROMETHEUS_BUILTIN
    for r in rules:
        assert metric_names(r["expr"]) <= known, (r["alert"], metric_names(r["expr"]) - known)


# --- dashboard ------------------------------------------------------------------------------------
def test_dashboard_metrics_exist() -> None:
    known = exported() | PROMETHEUS_BUILTIN | ORTHANC_METRICS_USED
    used = set()
    for expr in dashboard_exprs():
        names = metric_names(expr)
        assert names, expr
        assert names <= known, (expr, names - known)
        used |= names
    # it shows what the issue asks for: throughput, stage latency, queue, failures, deliveries, GPU
    for needed in (
        "pacs_node_jobs_total",
        "pacs_node_stage_duration_seconds_bucket",
        "pacs_node_job_duration_seconds_bucket",
        "pacs_node_queue_depth",
        "pacs_node_queue_oldest_job_age_seconds",
        "pacs_node_deliveries_total",
        "pacs_node_deliveries_pending",
        "pacs_node_gpu_utilization_ratio",
        "pacs_node_gpu_memory_used_bytes",
    ):
        assert needed in used, needed
    assert used >= ORTHANC_METRICS_USED


def test_metric_names_parser() -> None:
    assert metric_names('sum by (le, stage) (rate(a_b_bucket{model=~"x|y"}[5m])) / c offset 30m') == {
        "a_b_bucket",
        "c",
    }


def test_grafana_provisioning_matches_compose() -> None:
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/pacs-node.yml").read_text())
    path = prov["providers"][0]["options"]["path"]
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in grafana["volumes"]
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"


# --- compose ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [COMPOSE, CLUSTER], ids=lambda p: p.name)
def test_compose_valid_against_the_compose_specification(path: Path) -> None:
    import jsonschema

    schema = json.loads((DEPLOY / "compose-spec" / "compose-spec.json").read_text())
    compose = yaml.safe_load(path.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)
    # the schema must catch a mistake, or this test proves nothing
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] = "gpu"
    broken["services"][next(iter(broken["services"]))]["restart_policy"] = "always"
    assert len(list(jsonschema.Draft7Validator(schema).iter_errors(broken))) >= 2


def test_cluster_compose_content(tmp_path: Path) -> None:
    """compose.cluster.yaml: receivers on one index and one storage volume, workers on one queue."""
    compose = yaml.safe_load(CLUSTER.read_text())
    services = compose["services"]
    assert {"postgres", "receiver-a", "receiver-b", "worker"} <= set(services)
    receivers = [services["receiver-a"], services["receiver-b"]]
    for r in receivers:
        env = r["environment"]
        assert env["POSTGRESQL_PLUGIN_ENABLED"] == env["ORTHANC__POSTGRESQL__ENABLE_INDEX"] == "true"
        assert env["ORTHANC__POSTGRESQL__LOCK"] == "false"  # several Orthancs on one index
        assert "orthanc-storage:/var/lib/orthanc/db" in r["volumes"]  # the files the index names
        assert r["build"]["args"]["PLUGIN_EXTRAS"] == "postgres"
    assert receivers[0]["ports"] != receivers[1]["ports"]
    worker = services["worker"]
    assert worker["command"][:4] == ["pacs-node", "serve", "--role", "worker"]
    assert "postgres" in worker["build"]["args"]["EXTRAS"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    dockerfile = (ROOT / worker["build"]["dockerfile"]).read_text()
    assert "ARG EXTRAS" in dockerfile and "ARG PLUGIN_EXTRAS" in dockerfile
    # the workers' config: the queue the receivers' plugin writes, read through a receiver
    (tmp_path / "orthanc_worker_password").write_text("w")
    text = (ROOT / compose["configs"]["node_config"]["file"]).read_text().replace("/run/secrets/", f"{tmp_path}/")
    cfg = parse_config(yaml.safe_load(text))
    assert cfg.queue_url == receivers[0]["environment"]["ORTHANC__PACS_NODE__QUEUE"]
    assert cfg.orthanc_host == "receiver-a" and cfg.orthanc_url == "http://receiver-a:8042"
    assert cfg.orthanc_auth == ("worker", "w")
    for s in compose["secrets"].values():
        assert "${PACS_NODE_SECRETS" in s["file"]
    for svc in services.values():
        for sec in svc.get("secrets", []):
            assert (sec["source"] if isinstance(sec, dict) else sec) in compose["secrets"]
    # the optional Triton, and a worker config that uses it parses
    triton = services["triton"]
    assert triton["profiles"] == ["triton"] and "./triton-repository:/models:ro" in triton["volumes"]
    remote = parse_config({**yaml.safe_load(text), "runtime": "kserve", "kserve": {"url": "grpc://triton:8001"}})
    assert remote.kserve.url == "grpc://triton:8001" and "8001" in triton["expose"]
    init = ROOT / "deploy/postgres"
    assert "CREATE DATABASE orthanc" in "".join(p.read_text() for p in init.glob("*.sql"))


def test_compose_deployment_content() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"orthanc", "worker", "prometheus", "grafana"} <= set(services)
    # the worker has a GPU reserved
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    # Orthanc with its DICOMweb + Python plugins and a viewer on its DICOMweb (OHIF plugin)
    env = services["orthanc"]["environment"]
    assert (
        env["DICOM_WEB_PLUGIN_ENABLED"]
        == env["PYTHON_PLUGIN_ENABLED"]
        == env["OHIF_PLUGIN_ENABLED"]
        == "true"
    )
    assert env["ORTHANC__OHIF__DATA_SOURCE"] == "dicom-web"
    assert env["ORTHANC__AUTHENTICATION_ENABLED"] == "true"
    # persistent named volumes for Orthanc's storage and the queue, the queue shared with the worker
    assert {"orthanc-storage", "queue"} <= set(compose["volumes"])
    assert "orthanc-storage:/var/lib/orthanc/db" in services["orthanc"]["volumes"]
    assert "queue:/var/lib/pacs-node" in services["orthanc"]["volumes"]
    assert "queue:/var/lib/pacs-node" in services["worker"]["volumes"]
    # every file it names is in the repo (secrets excepted: they are not, on purpose)
    for section in ("configs",):
        for name, c in compose[section].items():
            assert (ROOT / c["file"]).is_file(), (section, name)
    dockerfile = (ROOT / services["worker"]["build"]["dockerfile"]).read_text()
    for svc in ("orthanc", "worker"):
        assert f" AS {services[svc]['build']['target']}" in dockerfile
    for src in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        if not src.startswith("--"):
            assert (ROOT / src).exists(), src
    # secrets come from files/environment outside the repo, and every one used is declared
    for svc in services.values():
        for s in svc.get("secrets", []):
            assert (s["source"] if isinstance(s, dict) else s) in compose["secrets"]
    for s in compose["secrets"].values():
        assert "environment" in s or "${PACS_NODE_SECRETS" in s["file"]
    # Prometheus scrapes the worker and Orthanc where compose puts them
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["pacs-node-worker"]["static_configs"][0]["targets"] == ["worker:9464"]
    assert jobs["orthanc"]["metrics_path"] == "/tools/metrics-prometheus"
    assert "9464" in services["worker"]["expose"]


def test_no_secret_in_the_repo_files() -> None:
    for path in (COMPOSE, CLUSTER, DEPLOY / "node.yaml", DEPLOY / "node.cluster.yaml", DEPLOY / "prometheus/prometheus.yml"):
        for m in re.finditer(
            r"(?im)^[ \t]*(\w*password\w*|GF_SECURITY_ADMIN_PASSWORD)[ \t]*:[ \t]*([^#\s].*)$",
            path.read_text(),
        ):
            assert m.group(2).startswith(("${", "/run/secrets/")) or "_file" in m.group(1).lower(), m.group(0)


def test_deploy_node_config_is_valid(tmp_path: Path, monkeypatch) -> None:
    text = (DEPLOY / "node.yaml").read_text().replace("/run/secrets/", f"{tmp_path}/")
    (tmp_path / "orthanc_worker_password").write_text("w-secret\n")
    (tmp_path / "archive_password").write_text("a-secret")
    cfg = parse_config(yaml.safe_load(text))
    assert cfg.orthanc_url == "http://orthanc:8042"
    assert cfg.orthanc_auth == ("worker", "w-secret")
    assert cfg.destination("archive").password == "a-secret"
    assert cfg.metrics_host == "0.0.0.0" and cfg.metrics_port == 9464
    assert str(cfg.queue_location) == "/var/lib/pacs-node/queue.sqlite"
    # the Orthanc side reads the same queue file
    orthanc = json.loads((DEPLOY / "orthanc/pacs-node.json").read_text())
    assert orthanc["PacsNode"]["Queue"] == str(cfg.queue_location)


def test_secret_references_fail_with_one_line(tmp_path: Path, monkeypatch) -> None:
    from node.config import ConfigError

    monkeypatch.delenv("PACS_NODE_NOPE", raising=False)
    with pytest.raises(ConfigError, match=r"^http_users\.w: environment variable PACS_NODE_NOPE is not set$"):
        parse_config({"http_users": {"w": "${env:PACS_NODE_NOPE}"}})
    with pytest.raises(ConfigError, match=r"destinations\[0\]\.password: cannot read secret file"):
        parse_config(
            {
                "destinations": [
                    {
                        "name": "a",
                        "kind": "dicomweb",
                        "url": "http://x",
                        "password": f"${{file:{tmp_path}/no}}",
                    }
                ]
            }
        )
    monkeypatch.setenv("PACS_NODE_PW", "s3cret")
    assert parse_config({"http_users": {"w": "${env:PACS_NODE_PW}"}}).http_users == {"w": "s3cret"}


def test_viewer_server_serves_ohif_our_config_and_proxies_dicomweb(tmp_path: Path) -> None:
    """deploy/viewer/serve.py: OHIF's files, our app-config.js, index.html for browser routes,
    /dicom-web/ passed to Orthanc with the Accept header and credentials, Orthanc's errors kept."""
    import base64
    import importlib.util
    import threading
    import urllib.error
    import urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    spec = importlib.util.spec_from_file_location("serve", ROOT / "deploy/viewer/serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "index.html").write_text("<html>ohif</html>")
    (dist / "app.js").write_text("console.log(1)")
    (dist / "app-config.js").write_text("window.config = {demo: 'aws'}")  # OHIF's own: must not be served
    seen = []

    class Orthanc(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            seen.append((self.path, self.headers.get("Accept"), self.headers.get("Authorization")))
            code, body = (404, b"no such study") if "missing" in self.path else (200, b"[]")
            self.send_response(code)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    servers = [ThreadingHTTPServer(("127.0.0.1", 0), Orthanc)]
    orthanc = f"http://127.0.0.1:{servers[0].server_port}"
    auth = "Basic " + base64.b64encode(b"viewer:secret").decode()
    servers.append(ThreadingHTTPServer(("127.0.0.1", 0), serve.make_handler(dist, orthanc, auth)))
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{servers[1].server_port}"

    def get(path: str, **headers) -> tuple[int, str, dict]:
        try:
            with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers)) as r:
                return r.status, r.read().decode(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(), dict(e.headers)

    try:
        assert get("/app.js")[1] == "console.log(1)"
        code, body, headers = get("/app-config.js")
        assert "/dicom-web" in body and "aws" not in body
        assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
        assert get("/viewer?StudyInstanceUIDs=1.2.3")[1] == "<html>ohif</html>"  # browser route
        assert get("/../../etc/passwd")[1] == "<html>ohif</html>"  # nothing outside dist
        code, body, _ = get("/dicom-web/studies?limit=1", Accept="application/dicom+json")
        assert (code, body) == (200, "[]")
        assert seen[-1] == ("/dicom-web/studies?limit=1", "application/dicom+json", auth)
        assert get("/dicom-web/studies/missing")[:2] == (404, "no such study")
    finally:
        for s in servers:
            s.shutdown()
