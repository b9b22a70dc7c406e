PYTHON ?= python3

.PHONY: install test test-fast bench run e2e-build crds crds-check

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

bench:
	$(PYTHON) bench/ingest.py
	$(PYTHON) bench/job_latency.py

# The CRDs are generated from clara_dicom/models.py; a unit test fails when they are stale.
crds:
	$(PYTHON) -m clara_operator.crdgen

crds-check:
	$(PYTHON) -m clara_operator.crdgen --check
