"""Fixtures of the bench tests: scripted fake servers, and running the bench in-process."""
import asyncio
import sys

import pytest

from tokenmill.bench.config import BenchConfig
from tokenmill.bench.execute import execute
from tokenmill.bench.fake_server import FakeServerThread


@pytest.fixture
def serve_script():
    """`serve_script(FakeScript(...))` starts a fake server in a thread; all stop at teardown."""
    servers = []

    def start(script):
        server = FakeServerThread(script).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)


@pytest.fixture
def quick_gil_handoff():
    """The fake server shares this process: its thread must get the GIL within
    a fraction of a millisecond (not the default 5 ms) for its timings to hold."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)
    yield
    sys.setswitchinterval(previous)


@pytest.fixture
def run_bench():
    """`run_bench(base_url, **BenchConfig fields)` -> BenchResult, without progress bars."""
    def run(base_url: str, **fields):
        return asyncio.run(execute(BenchConfig(base_url=base_url, progress=False, **fields)))

    return run
