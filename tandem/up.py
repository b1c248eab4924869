"""`tandem up`: the distributed topology on one machine, as the original's compose file ran it.

Starts redis-server (unless given a Redis URL), one proxy and N workers as child processes, and
stops them all on Ctrl-C or SIGTERM, or as soon as any of them dies.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tandem.errors import ConfigurationError
from tandem.files import PRIVATE_UMASK, private_dir
from tandem.settings import Settings

POLL_S = 0.2
STOP_TIMEOUT_S = 30.0


@dataclass
class Topology:
    settings: Settings
    workers: int
    redis_url: str | None = None
    children: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def run(self) -> int:
        stopping: list[int] = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda received, _frame: stopping.append(received))
        try:
            url = self.redis_url or self._start_redis()
            self._start_tandem(url)
            return self._watch(stopping)
        finally:
            self._stop_all()

    def _start_redis(self) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ConfigurationError(
                "redis-server is not installed; install it or pass --redis URL"
            )
        port = _free_port()
        directory = private_dir(self.settings.data_dir / "redis")
        # appendfsync always: a job id given out survives a crash of Redis as well.
        command = [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(directory),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--maxmemory",
            str(_memory_for_redis()),
            "--maxmemory-policy",
            "noeviction",
        ]
        self._spawn("redis", command, umask=PRIVATE_UMASK)  # its files hold the images
        _wait_for_port(port)
        return f"redis://127.0.0.1:{port}/0"

    def _start_tandem(self, url: str) -> None:
        tandem = [sys.executable, "-m", "tandem"]
        common = ["--model-dir", str(self.settings.model_dir)]
        # The URL goes in the environment: a command line is readable by every user, and
        # the URL may carry Redis's password.
        env = os.environ | {"TANDEM_REDIS_URL": url}
        self._spawn(
            "proxy",
            [
                *tandem,
                "serve",
                *common,
                "--host",
                self.settings.host,
                "--port",
                str(self.settings.port),
            ],
            env,
        )
        worker_env = env | self._worker_lanes()
        for index in range(self.workers):
            self._spawn(f"worker{index + 1}", [*tandem, "worker", *common], worker_env)

    def _worker_lanes(self) -> dict[str, str]:
        """Workers on one machine share its CPUs: unless lanes were set, each runs lanes for
        its share (at least one), rather than every worker a lane per CPU."""
        if self.settings.worker_lanes:
            return {}
        lanes = max(1, self.settings.worker_lane_count // self.workers)
        return {"TANDEM_WORKER_LANES": str(lanes)}

    def _spawn(
        self, name: str, command: list[str], env: dict[str, str] | None = None, umask: int = -1
    ) -> None:
        # Children ignore the terminal's Ctrl-C (own session); this process stops them in order.
        process = subprocess.Popen(command, start_new_session=True, env=env, umask=umask)
        self.children.append((name, process))
        print(f"tandem up: started {name} (pid {process.pid})", file=sys.stderr)

    def _watch(self, stopping: list[int]) -> int:
        while not stopping:
            for name, process in self.children:
                if process.poll() is not None:
                    print(
                        f"tandem up: {name} exited with {process.returncode}; stopping all",
                        file=sys.stderr,
                    )
                    return 1
            time.sleep(POLL_S)
        return 0

    def _stop_all(self) -> None:
        # Tandem processes first, so workers store their batch while Redis is still there.
        tandem = [child for child in self.children if child[0] != "redis"]
        _stop(tandem)
        _stop([child for child in self.children if child[0] == "redis"])


def _stop(children: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
    for _, process in children:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for name, process in children:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"tandem up: {name} did not stop in time; killing it", file=sys.stderr)
            process.kill()
            process.wait()


# cgroup v2's limit, then v1's: v1 writes a number near 2**63 for no limit, v2 "max".
CGROUP_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
)


def _memory_for_redis(cgroup_limits: tuple[Path, ...] = CGROUP_LIMITS) -> int:
    """Half the memory of this machine, or of its container: a backlog of images then meets
    Redis's limit, where new jobs are refused (503, with the fast answer) while the workers
    drain the queue, before the system's OOM killer. Half, since rewriting the append-only
    file forks Redis, and the copy may grow as large as what it copies."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in cgroup_limits:
        with contextlib.suppress(OSError, ValueError):  # no such file, or "max": no limit
            total = min(total, int(limit.read_text()))
    return total // 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise ConfigurationError(f"redis-server did not open port {port}")
