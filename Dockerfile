# clara-dicom: one image with every entry point (SPEC §6, §7).
#
#   docker build -t clara-dicom:0.1.0 .
#   docker run --rm clara-dicom:0.1.0 clara-dicom --help
#
# Entry points: clara-dicom (up, jobs, adapter, operator, results-service,
# register-results, import), register-results, and `python register.py` in the
# working directory /app, as Clara pipelines call it.
#
# tests/test_image_install.py runs this file's `python` RUN steps into a fresh
# virtualenv (no Docker engine there) and every entry point's --help: keep the
# install steps in RUN lines that start with `python` or `/opt/clara/bin/python`,
# and the paths under /src, /wheels, /opt/clara and /app.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: the project's wheel and wheels of all its dependencies
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY clara_dicom ./clara_dicom
COPY adapter ./adapter
COPY operator ./operator
COPY results ./results
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels /src
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels /wheels/clara_dicom-*.whl

# ---- runtime: slim Python, a virtualenv with the wheels, non-root
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/clara \
    PATH=/opt/clara/bin:$PATH
RUN python -m venv /opt/clara
COPY --from=builder /wheels /wheels
RUN /opt/clara/bin/python -m pip install --no-cache-dir --no-index --find-links /wheels clara-dicom
RUN rm -rf /wheels \
 && groupadd --gid 10001 clara \
 && useradd --uid 10001 --gid 10001 --home-dir /app --no-create-home --shell /usr/sbin/nologin clara
WORKDIR /app
COPY results/register.py /app/register.py
# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
# DICOM (adapter), HTTP health/metrics (adapter), operator liveness, Results Service
EXPOSE 11112 8080 8081 8088
CMD ["clara-dicom", "--help"]
