"""Settings of the Results Service (``clara-dicom results-service``) and of
register-results: defaults, types, limits and environment names
(convention and precedence: :mod:`clara_dicom.settings`)."""
from __future__ import annotations

import math
from typing import ClassVar

from pydantic import Field, field_validator

from clara_dicom.errors import UserError
from clara_dicom.settings import ComponentSettings, results_token
from clara_results import store as st

DEFAULT_PORT = 8088


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number of seconds")
    return value


class ResultsServiceSettings(ComponentSettings):
    component: ClassVar[str] = "Results Service (clara-dicom results-service)"
    flags: ClassVar[dict[str, str]] = {
        "resultsHost": "--host", "resultsPort": "--port", "resultsDatabase": "--database",
        "resultsMaxRetries": "--max-retries", "resultsLeaseSeconds": "--lease-seconds",
        "resultsRetryDelay": "--retry-delay", "resultsRetention": "--retention", "resultsTokenFile": "--token-file"}

    resultsHost: str = Field("0.0.0.0", description="Address the Results Service listens on.")
    resultsPort: int = Field(DEFAULT_PORT, ge=0, le=65535, description="Results Service TCP port (0: any free port).")
    resultsDatabase: str = Field("results.db", description="SQLite file path or sqlite:///PATH, or a PostgreSQL DSN "
                                 "postgresql://user@host:5432/db.")
    resultsMaxRetries: int = Field(st.DEFAULT_MAX_RETRIES, ge=1,
                                   description="Failures after which a task is Failed even with retryLater.")
    resultsLeaseSeconds: float = Field(st.DEFAULT_LEASE_SECONDS, gt=0,
                                       description="How long a lease lasts unless its holder renews it; an expired "
                                                   "lease counts as a failed attempt with retryLater.")
    resultsRetryDelay: float = Field(st.DEFAULT_RETRY_DELAY, ge=0,
                                     description="A task failed with retryLater waits this many seconds × "
                                                 "2^(retries-1) before it can be leased again.")
    resultsRetention: float = Field(st.DEFAULT_RETENTION_SECONDS, ge=0,
                                    description="Seconds finished tasks are kept.")
    resultsToken: str | None = Field(None, repr=False, description="Bearer token of the Results Service (the "
                                     "service checks it, its clients send it).")
    resultsTokenFile: str | None = Field(None, description="File holding that token (read instead of resultsToken).")

    check_finite = field_validator("resultsLeaseSeconds", "resultsRetryDelay", "resultsRetention")(_finite)

    def token(self) -> str:
        token = results_token(self.resultsToken, self.resultsTokenFile, "--token-file")
        if token is None:
            raise UserError("no token: set CLARA_RESULTS_TOKEN or pass --token-file PATH")
        return token


class RegisterSettings(ComponentSettings):
    """register-results. The job's identity (jobId … inputPaths) is the pipeline contract:
    the operator sets these variables in every pipeline container."""

    component: ClassVar[str] = "register-results"
    flags: ClassVar[dict[str, str]] = {
        "resultsUrl": "--url", "resultsTokenFile": "--token-file", "resultsAttempts": "--attempts",
        "resultsRetryWait": "--retry-wait", "resultsTimeout": "--timeout", "inputPaths": "--input"}

    resultsUrl: str | None = Field(None, description="Results Service URL, e.g. http://results:8088.")
    resultsToken: str | None = Field(None, repr=False, description="Bearer token of the Results Service (the "
                                     "service checks it, its clients send it).")
    resultsTokenFile: str | None = Field(None, description="File holding that token (read instead of resultsToken).")
    resultsAttempts: int = Field(6, ge=1, description="register-results: tries per request while the Results "
                                 "Service is unreachable.")
    resultsRetryWait: float = Field(1.0, ge=0, description="register-results: first wait between tries, doubling "
                                    "up to 30 s (longer when the service answers Retry-After).")
    resultsTimeout: float = Field(30.0, gt=0, description="register-results: seconds per request.")
    jobId: str | None = Field(None, description="Pipeline contract: the job's ID.")
    pipelineId: str | None = Field(None, description="Pipeline contract: the pipeline's ID.")
    payloadId: str | None = Field(None, description="Pipeline contract: the payload's ID.")
    operator: str | None = Field(None, description="Pipeline contract: the name of the pipeline operator (step) "
                                 "that runs register-results.")
    payloadRoot: str | None = Field(None, description="Pipeline contract: the job's payload directory; registered "
                                    "URIs are relative to it.")
    inputPaths: str | None = Field(None, description="Pipeline contract: directories to scan, colon-separated.")

    check_finite = field_validator("resultsRetryWait", "resultsTimeout")(_finite)
