# Two commands do all set-up on a fresh Debian machine:
#   make run    - install, then start the node (Orthanc + plugin + worker) on the embedded default
#   make test   - install, then the whole test suite (what CI runs)
# and: make demo - CT + MR phantoms through the offline pipeline into results/
VENV ?= .venv
PY := $(VENV)/bin/python
DEBS := dcmtk dicom3tools orthanc orthanc-python orthanc-dicomweb orthanc-gdcm prometheus libpixelmed-java \
	chromium postgresql python3-psycopg orthanc-postgresql python3-venv libpython3.11
# torch==2.13.0 resolves to a local CPU build on our machines; elsewhere pip takes it from PyPI.
TORCH ?= torch==2.13.0
# OHIF's published build (npm @ohif/app): `make viewer`, and the viewer test
OHIF_VERSION ?= 3.12.10
OHIF := .cache/ohif/package/dist
TRITON := .cache/triton

.PHONY: setup run demo test bench train evaluate conformance viewer screenshot gpu-wheels clean

$(VENV)/.installed: pyproject.toml
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,train,import,postgres,kserve]" "$(TORCH)"  # extras never replace the CPU torch
	# nnunetv2 pulls timm and with it PyPI's torchvision, built for CUDA torch: next to the CPU build its
	# operators do not load and transformers cannot import. nnU-Net's U-Nets need neither (only Primus does).
	$(PY) -m pip uninstall -y -q torchvision timm
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/pacs-node serve

demo: setup
	$(VENV)/bin/pacs-node demo --out results

test: setup $(OHIF)/index.html $(TRITON)/.installed
	$(VENV)/bin/ruff check node tests plugins conformance deploy
	# two workers, each taking whole files (module fixtures built once): most long tests wait on Orthanc,
	# PostgreSQL or a node, so they overlap even on two cores
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile \
		--durations=25  # the slowest tests, in every CI log: the whole CI run must stay under 30 min

bench: setup
	$(VENV)/bin/pacs-node bench --slices 100 300 600 --size 512 --output bench-cpu.json

train: setup
	$(VENV)/bin/pacs-node models train

evaluate: setup
	$(VENV)/bin/pacs-node models evaluate

conformance: setup $(OHIF)/index.html
	$(VENV)/bin/python -m conformance

# OHIF in front of the running node's Orthanc: http://127.0.0.1:3000/
$(OHIF)/index.html:
	@command -v npm >/dev/null || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get install -y -qq npm >/dev/null; }
	mkdir -p .cache/ohif
	cd .cache/ohif && npm pack -q @ohif/app@$(OHIF_VERSION) && tar xzf ohif-app-$(OHIF_VERSION).tgz

# a real Triton for the kserve tests: the tritonserver in PyPI's nvidia-pytriton wheel (Python backend
# only, no GPU needed), in a venv of Debian's python3, whose libpython its backend stub embeds
$(TRITON)/.installed:
	/usr/bin/python3 -m venv $(TRITON)
	$(TRITON)/bin/pip install -q nvidia-pytriton onnxruntime "numpy<2"
	cd $(TRITON)/lib/python3*/site-packages/pytriton/tritonserver && cp python_backend_stubs/$$(\
	  /usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')/triton_python_backend_stub backends/python/
	touch $@

viewer: setup $(OHIF)/index.html
	$(PY) deploy/viewer/serve.py --ohif $(OHIF) --orthanc http://127.0.0.1:8042

# the README's picture: the viewer test's own set-up (a phantom through the node, OHIF in headless
# Chromium on its SRs and SEG), its last view written to docs/
screenshot: setup $(OHIF)/index.html
	PACS_NODE_SCREENSHOTS=docs $(PY) -m pytest -q tests/test_viewer.py -k lists

# the GPU measurement (node/tools/gpu_bench.py) on a lent GPU machine: no network there, torch and
# transformers installed, Python 3.12; these wheels (~10 MB) are what it lacks. Then, with the device tool:
#   run(command="python3 -m pip install -q --no-index --no-deps .cache/gpu-wheels/*.whl &&
#       PYTHONPATH=. PYTHONUNBUFFERED=1 python3 -m node.tools.gpu_bench --out $$OUT", carry=[".cache/gpu-wheels"])
GPU_PLATFORM := --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --dest .cache/gpu-wheels
gpu-wheels:
	rm -rf .cache/gpu-wheels && mkdir -p .cache/gpu-wheels
	$(PY) -m pip download -q --no-deps $(GPU_PLATFORM) pydicom highdicom pyjpegls
	$(PY) -m pip download -q $(GPU_PLATFORM) pydantic   # with its exact pydantic-core

clean:
	rm -rf $(VENV) results .pytest_cache .cache
