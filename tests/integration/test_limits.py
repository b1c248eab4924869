"""`tandem serve` raises its limit on open files to what its guards let in."""

from __future__ import annotations

import resource
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import ServerProcess, tiny_env

WATCHES = 300
SOFT = 256  # under WATCHES: without the raise, the streams use up every file


def _server(tiny_dir: Path, tmp_path: Path, limit: Callable[[], None]) -> ServerProcess:
    env = tiny_env(tiny_dir, tmp_path, max_watches=str(WATCHES))
    server = ServerProcess(tmp_path / "server.log", env, "--no-worker")
    server.preexec = limit
    return server


def _soft_limit_only() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, hard))


def _hard_limit_too() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, SOFT))


@pytest.fixture
def streams() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def _stream(port: int, job_id: str) -> socket.socket:
    """An event stream, once its first event came."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET /job/{job_id}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    return sock


def test_a_low_soft_limit_is_raised_so_the_watch_guard_answers_first(
    tiny_dir: Path, tmp_path: Path, streams: list[socket.socket]
) -> None:
    server = _server(tiny_dir, tmp_path, _soft_limit_only).start()
    try:
        with server.client() as client:
            job_id = client.get("/predict/test").json()["job_id"]  # stays queued: no worker
            streams.extend(_stream(server.port, job_id) for _ in range(WATCHES))
            assert client.get("/health").status_code == 200
            refused = client.get(f"/job/{job_id}/events")
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "overloaded"
        assert server.process is not None
        limits = Path(f"/proc/{server.process.pid}/limits").read_text()
        [line] = [row for row in limits.splitlines() if row.startswith("Max open files")]
        soft, hard = line.split()[3:5]
        assert soft == hard
    finally:
        server.stop()


def test_a_hard_limit_under_the_guards_is_said_at_start_up(tiny_dir: Path, tmp_path: Path) -> None:
    server = _server(tiny_dir, tmp_path, _hard_limit_too).start()
    server.stop()
    assert f"may open {SOFT} files, under the {WATCHES + 32 + 256}" in server.log()
