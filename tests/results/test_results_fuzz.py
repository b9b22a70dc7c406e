"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis +
hypothesis): no request, valid or not, gets a 5xx; every 4xx has a message; responses
match the document (unknown query parameters are ignored, as HTTP APIs usually do, so
schemathesis' negative_data_rejection check is not used). Runs on SQLite and PostgreSQL (PostgreSQL is the stricter one: it
refuses NUL characters, so it catches validation gaps SQLite would hide).

schemathesis' own pytest plugin does not work with pytest 9, so each operation is driven
here through ``APIOperation.as_strategy`` and hypothesis' ``@given``.
"""
from __future__ import annotations

import time
import warnings

import pytest
from hypothesis import HealthCheck, given, settings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

from results_testlib import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_EXAMPLES = 30


def _operations() -> list[tuple[str, str]]:
    from clara_results.app import create_app
    from clara_results.store import open_store

    store = open_store(":memory:")
    try:
        doc = create_app(store, TOKEN).openapi()
    finally:
        store.close()
    return [(method.upper(), path, bool(op.get("parameters") or op.get("requestBody")))
            for path, item in doc["paths"].items() for method, op in item.items()]


OPERATIONS = [(m, p) for m, p, _ in _operations()]
# Negative (schema-violating) data exists only for operations that take input.
FUZZ_CASES = [(m, p, GenerationMode.POSITIVE) for m, p, _ in _operations()] + [
    (m, p, GenerationMode.NEGATIVE) for m, p, has_input in _operations() if has_input]


@pytest.fixture
def fuzz_schema(make_store):
    from clara_results.app import create_app
    from clara_results.models import NewTask

    store = make_store(clock=time.time, lease_seconds=60)
    # Something to find: tasks for a few agents, one leased.
    for agent in ("ClaraSCU", "a", "renderserver"):
        for _ in range(3):
            store.create(NewTask(job_id="j", pipeline_id="p", payload_id="x", agent=agent, uris=("a.dcm",)))
    store.lease("ClaraSCU", 1)
    app = create_app(store, TOKEN)
    return schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)


def _operation(schema, method: str, path: str):
    return schema[path][method]


@pytest.mark.parametrize("method,path,mode", FUZZ_CASES, ids=[f"{m} {p} {g.value}" for m, p, g in FUZZ_CASES])
def test_no_server_errors(fuzz_schema, method, path, mode):
    operation = _operation(fuzz_schema, method, path)

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        response = case.call(headers=AUTH)
        assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text}"
        if response.status_code >= 400:
            message = response.json().get("message")
            assert isinstance(message, str) and message, response.text
        case.validate_response(
            response,
            checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                    response_schema_conformance],
            headers=AUTH,
        )

    check()


@pytest.mark.parametrize("method,path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_without_the_token_everything_but_health_is_401(fuzz_schema, method, path):
    operation = _operation(fuzz_schema, method, path)

    @given(case=operation.as_strategy())
    @settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        response = case.call(headers={"Authorization": "Bearer not-the-token"})
        if path.startswith("/health/"):
            assert response.status_code in (200, 503)
        else:
            assert response.status_code == 401

    check()
