PYTHON ?= python3

.PHONY: install test test-fast test-container bench run e2e-build image crds crds-check

install:
	$(PYTHON) -m pip install -e '.[test]'

# The whole suite, as CI runs it (real dcmtk, Orthanc, PostgreSQL, kube-apiserver).
test:
	$(PYTHON) -m pytest -q

# Unit and component tests only: nothing external needed.
test-fast:
	$(PYTHON) -m pytest -q -m "not dcmtk and not orthanc and not postgres and not e2e and not slow"

run:
	clara-dicom up --config examples/local --state ./state

e2e-build:
	bash e2e/build.sh

# clara-dicom:<version> with docker (when a daemon answers) or buildah; where
# python:3.11-slim cannot be pulled, on a base built from Debian packages.
# Cached by content under ~/.cache/clara-dicom/image (see tools/image/build.sh).
image:
	bash tools/image/build.sh

# The image run in podman: entry points, adapter + storescu, register-results.
test-container:
	$(PYTHON) -m pytest -q -m container

bench:
	$(PYTHON) bench/ingest.py
	$(PYTHON) bench/job_latency.py

# The CRDs are generated from clara_dicom/models.py; a unit test fails when they are stale.
crds:
	$(PYTHON) -m clara_operator.crdgen

crds-check:
	$(PYTHON) -m clara_operator.crdgen --check
