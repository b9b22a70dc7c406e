# syntax=docker/dockerfile:1
# clara-dicom: one image with every entry point (SPEC §6, §7, §9 "Image").
#
#   make image                 # = tools/image/build.sh: docker or buildah, base chosen for you
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt \
#       --build-arg VERSION=0.1.0 -t clara-dicom:0.1.0 .
#
# Entry points: clara-dicom (up, jobs, adapter, operator, results-service,
# register-results, import), register-results, and `python register.py` in the
# working directory /app, as Clara pipelines call it.
#
# PYTHON_IMAGE is any image with python3 >= 3.11 and python3's venv module at the
# same path in both stages (python:3.11-slim, or the Debian-built base that
# tools/image/build.sh makes where no registry is reachable).
# The optional build secret `ca` is a CA bundle for pip (a TLS-intercepting proxy);
# it is mounted for one RUN step only and never stored in a layer.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: a virtualenv at /opt/clara with the project and its dependencies
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python3 -c 'import sys; assert sys.version_info >= (3, 11), "clara-dicom needs Python >= 3.11, this base has " + sys.version' \
 && python3 -m venv /opt/clara
WORKDIR /src
# Dependencies first, from pyproject.toml alone: a source change does not re-download them.
COPY pyproject.toml ./
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > /tmp/requirements.txt \
 && /opt/clara/bin/python -m pip install -q -r /tmp/requirements.txt
# The context is .dockerignore's allow-list: pyproject.toml, README.md, the four packages.
COPY . ./
# pip and setuptools are not needed at run time: removed here, in the builder, so
# no layer of the final image holds them.
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && /opt/clara/bin/python -m pip install -q --no-deps /src \
 && /opt/clara/bin/python -m pip uninstall -y -q setuptools pip

# ---- runtime: the base, the virtualenv, register.py; non-root
FROM ${PYTHON_IMAGE}
ARG VERSION=dev
LABEL org.opencontainers.image.title="clara-dicom" \
      org.opencontainers.image.description="DICOM adapter, Kubernetes operator and Results Service: studies received over DICOM become AI pipeline jobs" \
      org.opencontainers.image.source="https://github.com/clara-dicom/clara-dicom" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/clara \
    PATH=/opt/clara/bin:$PATH
RUN groupadd --gid 10001 clara \
 && useradd --uid 10001 --gid 10001 --home-dir /app --no-create-home --shell /usr/sbin/nologin clara
COPY --from=builder /opt/clara /opt/clara
WORKDIR /app
COPY results/register.py /app/register.py
# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
# DICOM (adapter), HTTP health/metrics (adapter), operator liveness, Results Service
EXPOSE 11112 8080 8081 8088
CMD ["clara-dicom", "--help"]
