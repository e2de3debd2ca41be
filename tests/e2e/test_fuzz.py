"""Fuzz the REST API from its own OpenAPI schema (schemathesis) against a real uvicorn process:
no 5xx, and every documented response matches its schema. Bounded: a few examples per operation,
so the whole run takes well under two minutes on two cores."""

from __future__ import annotations

import itertools

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

from tests.e2e.stack import Stack, base_env
from tests.services import free_port

pytestmark = pytest.mark.slow
EXAMPLES = int(__import__("os").environ.get("DFQ_FUZZ_EXAMPLES", "12"))


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory):
    """The API alone (SQLite, filesystem broker, no worker: queued tasks simply wait)."""
    data = tmp_path_factory.mktemp("fuzz") / "data"
    env = {**base_env(data), "DFQ_JOB_SUBMIT_LIMIT": "0", "DFQ_MAX_UPLOAD_BYTES": "200000"}
    stack = Stack("fuzz", data, env, free_port())
    stack.start(
        "api",
        [
            "dfq",
            "serve",
            "--no-worker",
            "--host",
            "127.0.0.1",
            "--port",
            str(stack.port),
            "--data-dir",
            str(data),
        ],
    )
    stack.wait_healthy()
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def fuzz_headers(fuzz_stack):
    return fuzz_stack.token("fuzzer")


@pytest.fixture(scope="module")
def api_schema(fuzz_stack):
    schema = schemathesis.openapi.from_url(fuzz_stack.base_url + "/openapi.json")
    # the REST API is the contract; the dashboard's HTML forms are tested by the browser tests
    return schema.include(path_regex=r"^/api/v1/").exclude(path_regex=r"/events$")


CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


def test_api_never_500s_and_answers_match_the_schema(fuzz_stack, fuzz_headers, api_schema):
    """Every /api/v1 operation, ``EXAMPLES`` valid and ``EXAMPLES`` invalid generated cases each."""
    failures: dict[str, str] = {}
    calls = 0
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    for operation, mode in itertools.product(operations, GenerationMode):

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  derandomize=True, database=None)  # fmt: skip
        def fuzz(case) -> None:
            nonlocal calls
            calls += 1
            case.call_and_validate(
                base_url=fuzz_stack.base_url, headers=fuzz_headers, checks=CHECKS, timeout=30
            )

        try:
            fuzz()
        except Unsatisfiable:  # nothing in this operation can be made invalid (only free-form strings)
            continue
        except Exception as exc:  # keep going: report every failing operation at once
            failures[f"{operation.label} ({mode.value})"] = str(exc)[:2000]
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    assert calls >= 2 * len(operations)
    print(f"fuzzed {len(operations)} operations with {calls} requests")


def test_the_server_is_still_up_after_fuzzing(fuzz_stack):
    import httpx

    assert httpx.get(fuzz_stack.base_url + "/healthz", timeout=5).status_code == 200
    assert fuzz_stack.procs["api"].popen.poll() is None
