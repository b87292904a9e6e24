"""Fuzzing the server from its own published schema (schemathesis): no request the schema lets a client
build, nor one it does not, gets a 5xx, and every response conforms to the schema (status code, content
type, body). Kept short: a bounded number of examples per operation and answers of a few tokens (about
half a minute). Each run draws new examples; a failure prints the seed that repeats it
(``pytest --hypothesis-seed=N``)."""

import pytest
from serve_support import serve

schemathesis = pytest.importorskip("schemathesis")  # in the test extra
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402 (comes with schemathesis)
from schemathesis.checks import (content_type_conformance, negative_data_rejection, not_a_server_error,  # noqa: E402
                                 response_schema_conformance, status_code_conformance)

LIMITS = dict(default_max_tokens=2, max_n=2, max_images=2, max_image_pixels=64 * 64, max_request_pixels=2 * 64 * 64,
              max_body_bytes=256 * 1024)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.fixture(scope="module")
def fuzzed_server(janus_dir):
    with serve(janus_dir, limits=LIMITS, body_timeout_s=5) as running:
        yield running


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    return schemathesis.openapi.from_url(fuzzed_server.url + "/openapi.json")


def _short(case) -> None:
    """Answers of a few tokens: the fuzzer is after bad input, not long decoding."""
    body = case.body
    for name in ("max_tokens", "max_completion_tokens"):
        if isinstance(body, dict) and type(body.get(name)) is int and body[name] > 4:
            body[name] = 4


POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
# (method, path, what the fuzzer makes: bodies the schema allows or ones it does not, examples)
CASES = [("POST", "/v1/chat/completions", POSITIVE, 300), ("POST", "/v1/chat/completions", NEGATIVE, 300),
         ("POST", "/v1/completions", POSITIVE, 150), ("POST", "/v1/completions", NEGATIVE, 150),
         ("POST", "/v1/images/generations", POSITIVE, 100), ("POST", "/v1/images/generations", NEGATIVE, 100),
         ("POST", "/tokenize", POSITIVE, 100), ("POST", "/tokenize", NEGATIVE, 100),
         ("POST", "/detokenize", POSITIVE, 50), ("POST", "/detokenize", NEGATIVE, 50),
         ("GET", "/v1/models", POSITIVE, 3), ("GET", "/health", POSITIVE, 3), ("GET", "/stats", POSITIVE, 3)]


@pytest.mark.parametrize("method,path,mode,examples", CASES, ids=[f"{m} {p} {g.value}" for m, p, g, _ in CASES])
def test_no_request_from_the_schema_gets_a_5xx_and_every_answer_conforms(api_schema, fuzzed_server, method, path,
                                                                         mode, examples):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    def check(case):
        _short(case)
        response = case.call(base_url=fuzzed_server.url, timeout=60)
        # a body over --max-body-bytes is refused before it is read (413): a rejection, whatever it held
        excluded = [negative_data_rejection] if response.status_code == 413 else []
        case.validate_response(response, checks=[c for c in CHECKS if c not in excluded])

    check()
