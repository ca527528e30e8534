"""Schema-driven fuzzing: requests generated from the server's own OpenAPI schema
(valid and invalid ones) never get a 5xx, and the server stays up.

The fuzzed server caps max_tokens at 1 and ends any request after a few seconds,
so random requests stay cheap; the run is bounded by a fixed example count per
operation and mode, and derandomized (the same requests every run).
"""
import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from server_harness import COMMON_ARGS, start_server

EXAMPLES = 30  # per operation and generation mode; fewer valid generation requests, the costly ones
GENERATING_EXAMPLES = 12
POST_OPERATIONS = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]
GET_OPERATIONS = ["/health", "/metrics", "/v1/models"]


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory):
    server = start_server(tmp_path_factory, *COMMON_ARGS, "--max-tokens-cap", "1", "--request-timeout", "3")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    config = schemathesis.Config.from_dict({"base-url": fuzzed_server.base_url, "request-timeout": 60})
    return schemathesis.openapi.from_url(f"{fuzzed_server.base_url}/openapi.json", config=config)


def fuzz(operation, mode: GenerationMode, examples: int) -> None:
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    def run(case):
        case.call_and_validate(checks=[not_a_server_error])

    run()


def test_every_operation_is_fuzzed(api_schema):
    operations = {(result.ok().method.upper(), result.ok().path) for result in api_schema.get_all_operations()}
    assert operations == {("POST", path) for path in POST_OPERATIONS} | {("GET", path) for path in GET_OPERATIONS}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda mode: mode.value)
@pytest.mark.parametrize("path", POST_OPERATIONS)
def test_generated_bodies_never_get_a_server_error(api_schema, path, mode):
    generating = mode == GenerationMode.POSITIVE and path.startswith("/v1/")
    fuzz(api_schema[path]["POST"], mode, GENERATING_EXAMPLES if generating else EXAMPLES)


@pytest.mark.parametrize("path", GET_OPERATIONS)
def test_get_endpoints_never_get_a_server_error(api_schema, path):
    fuzz(api_schema[path]["GET"], GenerationMode.POSITIVE, 3)


def test_server_is_still_healthy_after_fuzzing(fuzzed_server):
    assert fuzzed_server.process.poll() is None
    assert fuzzed_server.health_status() == 200
    fuzzed_server.wait_idle()
