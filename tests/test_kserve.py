"""Remote inference over the KServe v2 protocol, against a real Triton Inference Server.

The server is the ``tritonserver`` of PyPI's ``nvidia-pytriton`` wheel (Triton 2.5x, Python backend
only, no GPU needed), in the venv ``make test`` builds at ``.cache/triton``. It serves the repository
``pacs-node models export-triton --backend python`` writes: each graph run by ONNX Runtime in
Triton's Python backend, the backbone and per-slice heads joined by Triton's own ensemble scheduler.
The ``onnxruntime`` backend variant differs only in its ``backend`` line (checked on paper here).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from orthanc_fixture import Node, Pacs, free_port, orthanc_missing, wait_for
from pydicom import dcmread

from node.cli import EXIT_INPUT, EXIT_OK, main
from node.model.engine_cache import file_sha256
from node.model.manifest import MODELS_DIR, load_model
from node.model.triton_repository import DIGEST_KEY, TritonBackend, export
from node.synthetic.dicom import Patient, write_axial_series
from node.synthetic.phantom import Phantom

VENV = Path(__file__).resolve().parent.parent / ".cache" / "triton"
SITE = next(VENV.glob("lib/python3*/site-packages"), None)


class Triton:
    """``tritonserver`` on a model repository, with the Python backend's interpreter from VENV."""

    def __init__(self, repo: Path, log: Path):
        self.repo, self.log = repo, log
        self.http, self.grpc, self.metrics = free_port(), free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        server = SITE / "pytriton" / "tritonserver"
        env = dict(os.environ, PATH=f"{VENV / 'bin'}:{os.environ['PATH']}", LD_LIBRARY_PATH=str(SITE / "nvidia_pytriton.libs"))
        self.proc = subprocess.Popen(
            [
                server / "bin" / "tritonserver", "--model-repository", self.repo,
                "--backend-directory", server / "backends", "--http-port", str(self.http),
                "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), "--exit-timeout-secs", "2",
            ],
            env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )  # fmt: skip

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"tritonserver exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/v2/health/ready", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(ready, 90, "tritonserver to load the repository")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    if SITE is None or not (SITE / "pytriton").is_dir():
        pytest.skip("no Triton here: `make test` builds it in .cache/triton")
    root = tmp_path_factory.mktemp("triton")
    export(load_model("phantom-fm"), root / "repo", TritonBackend.PYTHON, gpu=False)
    server = Triton(root / "repo", root / "tritonserver.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ct")
    assert main(["phantom", str(out), "--slices", "24", "--size", "128", "--seed", "5"]) == EXIT_OK
    return out


def test_export_writes_each_graph_and_the_ensemble_with_its_digest(tmp_path):
    model = load_model("phantom-fm")
    names = export(model, tmp_path, TritonBackend.ONNXRUNTIME)
    assert names == [
        "phantom-fm__backbone", "phantom-fm__organs", "phantom-fm__lesions", "phantom-fm__lesion_presence", "phantom-fm",
    ]  # fmt: skip
    backbone = (tmp_path / "phantom-fm__backbone" / "config.pbtxt").read_text()
    assert 'backend: "onnxruntime"' in backbone and "KIND_GPU" in backbone
    assert f'"{DIGEST_KEY}" value {{ string_value: "{file_sha256(MODELS_DIR / "phantom-fm" / "backbone.onnx")}" }}' in backbone
    assert (tmp_path / "phantom-fm__backbone" / "1" / "model.onnx").read_bytes() == (
        MODELS_DIR / "phantom-fm" / "backbone.onnx"
    ).read_bytes()
    assert not (tmp_path / "phantom-fm__backbone" / "1" / "model.py").exists()
    ensemble = (tmp_path / "phantom-fm" / "config.pbtxt").read_text()
    assert 'platform: "ensemble"' in ensemble
    # the per-slice heads' outputs, and the tokens the presence head reads per slice; not cls, which no head reads
    for out in ('"head_organs"', '"head_lesions"', 'name: "tokens"'):
        assert out in ensemble
    assert '"cls"' not in ensemble and '"head_lesion_presence"' not in ensemble
    # the python variant differs only in its backend (and the script that runs the graph)
    export(model, tmp_path / "py", TritonBackend.PYTHON, gpu=False)
    py = (tmp_path / "py" / "phantom-fm__backbone" / "config.pbtxt").read_text()
    assert py == backbone.replace('"onnxruntime"', '"python"').replace("KIND_GPU", "KIND_CPU")
    assert (tmp_path / "py" / "phantom-fm__backbone" / "1" / "model.py").exists()


def _outputs(folder: Path) -> dict[str, object]:
    (series,) = [p for p in folder.iterdir() if p.is_dir()]
    return {p.stem: dcmread(p) for p in series.glob("*.dcm")}


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_kserve_results_equal_local_inference(triton: Triton, ct: Path, tmp_path, protocol):
    assert main(["run", str(ct), "--out", str(tmp_path / "local"), "--runtime", "onnxruntime", "--no-progress"]) == EXIT_OK
    url = f"grpc://127.0.0.1:{triton.grpc}" if protocol == "grpc" else f"http://127.0.0.1:{triton.http}"
    argv = ["run", str(ct), "--out", str(tmp_path / "remote"), "--runtime", "kserve", "--kserve", url, "--no-progress"]
    assert main(argv) == EXIT_OK
    local, remote = _outputs(tmp_path / "local"), _outputs(tmp_path / "remote")
    assert sorted(local) == sorted(remote) == ["gsps", "outlines", "pmap", "seg", "sr"]
    assert remote["seg"].PixelData == local["seg"].PixelData
    assert [s.SegmentLabel for s in remote["seg"].SegmentSequence] == [s.SegmentLabel for s in local["seg"].SegmentSequence]
    assert np.array_equal(remote["pmap"].pixel_array, local["pmap"].pixel_array)
    assert any(s.SegmentLabel.startswith("Lesion") for s in local["seg"].SegmentSequence)
    # the SR's findings, measurements and the presence head's probability, value for value
    assert remote["sr"].ContentSequence == local["sr"].ContentSequence
    # and each result names what made it
    params = remote["seg"].SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert f"kserve-{protocol}" in params


def test_kserve_refuses_a_server_serving_other_graphs(triton: Triton, ct: Path, tmp_path, capsys):
    import onnx

    changed = tmp_path / "phantom-fm"
    shutil.copytree(MODELS_DIR / "phantom-fm", changed, ignore=shutil.ignore_patterns("source", "*.pt2"))
    head = onnx.load(changed / "head_lesions.onnx")
    head.doc_string = "retrained"  # another file: the server still serves the old one
    onnx.save(head, changed / "head_lesions.onnx")
    argv = ["run", str(ct), "--out", str(tmp_path / "out"), "--model", str(changed), "--runtime", "kserve"]
    assert main([*argv, "--kserve", f"grpc://127.0.0.1:{triton.grpc}", "--no-progress"]) == EXIT_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model phantom-fm__lesions is not built from" in err[0], err
    assert "pacs-node models export-triton" in err[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.dcm"))


def test_kserve_server_down_is_one_line(ct: Path, tmp_path, capsys):
    argv = ["run", str(ct), "--out", str(tmp_path / "out"), "--runtime", "kserve"]
    assert main([*argv, "--kserve", f"http://127.0.0.1:{free_port()}", "--no-progress"]) == EXIT_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: series ") and "kserve server http://127.0.0.1:" in err[0], err
    assert "Traceback" not in err[0]


@pytest.mark.slow
@pytest.mark.skipif(bool(orthanc_missing()), reason=orthanc_missing() or "")
def test_node_waits_for_its_inference_server_and_loses_nothing(triton: Triton, pacs: Pacs, tmp_path):
    """The node on runtime kserve: while Triton is down its job is given back, attempt not counted, and
    done once Triton is back; the outputs reach the PACS once."""
    triton.stop()
    n = Node(
        tmp_path / "node",
        {
            "ae_title": "PACSNODE", "dicom_port": free_port(), "http_port": free_port(), "metrics_port": free_port(),
            "data_dir": str(tmp_path / "node" / "data"), "stable_age_s": 2,
            "runtime": "kserve", "kserve": {"url": f"grpc://127.0.0.1:{triton.grpc}", "timeout_s": 60},
            "destinations": [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.port, "ae_title": "PACS"}],
            "priors": {"enabled": False},
            "worker": {"lease_s": 10, "heartbeat_s": 1, "poll_s": 0.2, "max_attempts": 1},
        },
    )  # fmt: skip
    n.start()  # a worker starts while its inference server is down
    try:
        s = write_axial_series(
            Phantom.random(72, n_lesions=1), tmp_path / "ct", modality="CT", shape=(16, 96, 96),
            pixel_spacing=4.0, slice_spacing=8.0, seed=72, patient=Patient(name="SECRET^KS", id="SECRETKS"),
        )  # fmt: skip
        n.store_scu(s.files)

        def given_back() -> int:
            jobs = n.jobs_of(s.series_uid)
            history = n.job(jobs[0]["id"])["history"] if jobs else []
            return sum(h["event"] == "error, will retry" and "kserve server" in (h["detail"] or "") for h in history)

        wait_for(lambda: given_back() >= 2, 60, "the job given back twice")  # beyond max_attempts: 1
        triton.start()
        job = n.wait_job(s.series_uid, ("done",), timeout=120)
        assert job["attempts"] == 1 and job["error"] is None  # the attempts Triton was down did not count
        got = wait_for(lambda: len({r.sop_class for r in pacs.of_study(s.study_uid)}) >= 3 or None, 60, "outputs")
        assert got and all(c == 1 for c in pacs.counts(s.study_uid).values())
        assert "SECRET" not in n.log.read_text()
    finally:
        assert n.stop() == 0
        if triton.proc is None or triton.proc.poll() is not None:
            triton.start()  # for any test after this one


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"runtime": "kserve"}, "runtime kserve needs kserve: {url: grpc://host:port}"),
        ({"runtime": "kserve", "kserve": {"url": "triton:8001"}}, "kserve.url: String should match pattern"),
        ({"models": [{"model": "phantom-fm", "runtime": "kserve"}]}, "runtime kserve needs kserve"),
    ],
)
def test_kserve_config_errors_say_what_is_missing(data, message):
    from node.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(data)
