"""Fixtures of the server tests: one default `tokenmill serve` for the whole session
(most tests use it); modules that need other flags start their own, small servers."""
import pytest
from server_harness import COMMON_ARGS, start_server


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The default server: default model, small context, no limits beyond the defaults."""
    server = start_server(tmp_path_factory, *COMMON_ARGS)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(server):
    return server.client(timeout=120)
