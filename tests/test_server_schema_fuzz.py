"""Schemathesis against a live edge-serve: requests generated from the OpenAPI document the server
publishes (/openapi.json), valid and invalid by the schema, on every /v1 route.

Whatever comes in: no 5xx; every 4xx is an OpenAI error body whose message says what is wrong and
whose `param` names the field (or whose code says the whole request is at fault); and the server
answers a normal request afterwards. The examples tried and the time taken are printed (pytest -s)
and recorded as test properties (--junitxml).
"""
from __future__ import annotations

import collections
import time

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")  # the dev extra; a plain runtime install lacks it
from hypothesis import HealthCheck, given, settings  # noqa: E402  (schemathesis brings hypothesis)
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

from edge_models.qwen3vl.synthetic import SyntheticSpec  # noqa: E402
from support.server import ServerProcess  # noqa: E402

SPEC = SyntheticSpec(tied=False, seed=3)
ADMIN = "fuzz-admin-key"
EXAMPLES = {"POST /v1/chat/completions": 40, "PUT /v1/conversations/{conv_id}": 15}  # per mode; others below
OTHER_EXAMPLES = 8
# 4xx codes that are about the whole request rather than one field
WHOLE_REQUEST = {"invalid_json", "json_too_deep", "conversation_not_found", "unsupported_media_type"}


@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory):
    conversations = tmp_path_factory.mktemp("fuzz-conversations")
    with ServerProcess(artifacts.converted(SPEC, "f16"),
                       ["--parallel", "2", "--ctx-size", "1024", "--threads", "1", "--max-tokens", "4",
                        "--conversation-dir", str(conversations)], env={"EDGE_ADMIN_KEY": ADMIN}) as proc:
        yield proc


def check(response: httpx.Response, where: str) -> tuple:
    """The response's outcome class, after asserting it is one the server may give."""
    assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:500]}"
    if response.status_code < 400:
        return (response.status_code,)
    error = response.json()["error"]
    assert isinstance(error["message"], str) and len(error["message"]) >= 8, (where, error)
    routed = response.status_code in (404, 405) and error["code"] is None  # Starlette: no such route
    assert error["param"] or error["code"] in WHOLE_REQUEST or routed or response.status_code != 400, (where, error)
    return response.status_code, error["code"], bool(error["param"])


def test_generated_requests_never_get_a_5xx_and_every_4xx_names_what_is_wrong(server, record_property):
    document = httpx.get(server.url("/openapi.json"), timeout=30).json()
    schema = schemathesis.openapi.from_dict(document)
    outcomes: dict[str, collections.Counter] = {}
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        if not operation.path.startswith("/v1"):
            continue  # the same routes without the prefix
        name = f"{operation.method.upper()} {operation.path}"
        seen = outcomes.setdefault(name, collections.Counter())
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=EXAMPLES.get(name, OTHER_EXAMPLES), deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(operation.as_strategy(generation_mode=mode))
            def call(case):
                headers = {"Authorization": f"Bearer {ADMIN}"} if "conversations" in operation.path else {}
                seen[check(case.call(base_url=server.base_url, headers=headers, timeout=60), name)] += 1

            try:
                call()
            except Unsatisfiable:
                pass  # no parameter and no body: nothing can be made invalid
    took = time.monotonic() - started
    tried = sum(sum(c.values()) for c in outcomes.values())
    for name, seen in outcomes.items():
        print(f"{name}: {sum(seen.values())} examples: {dict(seen)}")
        record_property(name, sum(seen.values()))
    print(f"schema fuzz: {tried} examples in {took:.1f} s")
    record_property("examples", tried)
    record_property("seconds", round(took, 1))
    assert sum(outcomes["POST /v1/chat/completions"].values()) >= 40  # both modes ran
    answer = httpx.post(server.url("/v1/chat/completions"), timeout=60,
                        json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
    assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert httpx.get(server.url("/v1/health")).json()["status"] == "ok"
