"""Where a proxy's time goes while clients send images back to back (`--profile`, one client
unless `--clients N`).

Two views of the same run, both per request:
- CPU by thread, from /proc: exact, and costs the proxy nothing; with the load generator's own
  (a process of its own, on the same cores) and the requests per second;
- the Python frames each thread was in, sampled by py-spy (non-blocking, so the proxy is
  not stopped to be sampled), as inclusive time, with the raw stacks kept for flame graphs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SAMPLE_HZ = 250
TICKS_PER_S = os.sysconf("SC_CLK_TCK")
_THREAD = re.compile(r"^thread \((?:0x)?[0-9a-f]+\): (?P<name>[^;]+)$")
_LINE = re.compile(r":\d+\)$")  # frames are told apart by function, not line


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid`, by thread id."""
    times = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        times[int(task.name)] = (int(fields[11]) + int(fields[12])) / TICKS_PER_S
    return times


def _py_spy() -> str:
    """py-spy beside this Python (a virtual environment's bin), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.is_file() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("--profile needs py-spy (pip install py-spy)")
    return found


_DUMPED = re.compile(r'^Thread (?P<tid>\d+) \([^)]*\): "(?P<name>[^"]+)"', re.MULTILINE)


def thread_names(pid: int) -> dict[int, str]:
    """Python's names for the threads py-spy sees; ONNX Runtime's own threads are not among them."""
    dump = subprocess.run(
        [_py_spy(), "dump", "--nonblocking", "--pid", str(pid)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {int(m["tid"]): m["name"] for m in _DUMPED.finditer(dump)}


@dataclass
class Stacks:
    """py-spy's collapsed stacks, per Python thread: samples in each function (inclusive)."""

    samples: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    @classmethod
    def parse(cls, lines: Iterable[str]) -> Stacks:
        stacks = cls()
        for line in lines:
            stack, _, count = line.rstrip().rpartition(" ")
            thread, *frames = stack.split(";")
            named = _THREAD.match(thread)
            if not named or not count.isdigit():
                continue
            # Each function once per sample, however deep it recurses.
            for frame in {_LINE.sub(")", frame) for frame in frames}:
                stacks.samples[named["name"]][frame] += int(count)
        return stacks

    def total(self, thread: str) -> int:
        """The thread's samples: those of the frame that every one of them holds."""
        return max(self.samples[thread].values())

    def top(self, thread: str, n: int) -> list[tuple[str, int]]:
        """The busiest frames below the ones every sample holds (the thread's entry point)."""
        total = self.total(thread)
        return [item for item in self.samples[thread].most_common() if item[1] < total][:n]


def record(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """Start py-spy on `pid` for `seconds`, writing collapsed stacks to `out`."""
    command = [_py_spy(), "record", "--pid", str(pid), "--duration", str(int(seconds))]
    command += ["--rate", str(SAMPLE_HZ), "--format", "raw", "--threads", "--nonblocking"]
    command += ["--output", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@dataclass(frozen=True)
class Profile:
    clients: int
    requests: int
    per_s: float  # requests a second
    cpu_s: dict[str, float]  # CPU seconds per request, by thread
    client_cpu_s: float  # the load generator's CPU seconds per request
    frames_s: dict[str, list[tuple[str, float]]]  # each thread's top frames, s per request
    stacks: Path

    def as_json(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "requests": self.requests,
            "per_s": self.per_s,
            "cpu_s": self.cpu_s,
            "client_cpu_s": self.client_cpu_s,
            "frames_s": self.frames_s,
            "stacks": str(self.stacks),
        }


def _children_cpu_s() -> float:
    """CPU seconds of this process's children that have ended (the load generator's runs)."""
    times = os.times()
    return times.children_user + times.children_system


def profile(
    pid: int, seconds: float, out: Path, drive: Callable[[float], int], clients: int = 1
) -> Profile:
    """Run `drive(seconds)` (it returns how many requests it made, from `clients` at once, in
    a child process of this one) against the proxy `pid`, measuring it; raw stacks are
    written to `out`."""
    names = thread_names(pid)
    before, client_before = thread_cpu_s(pid), _children_cpu_s()
    spy = record(pid, seconds + 1, out)
    started = time.perf_counter()
    requests = drive(seconds)
    elapsed = time.perf_counter() - started
    after, client_after = thread_cpu_s(pid), _children_cpu_s()
    spy.wait()
    cpu = {
        names.get(tid, f"native thread {tid}"): (after[tid] - before.get(tid, 0.0)) / requests
        for tid in after
        if after[tid] > before.get(tid, 0.0)
    }
    stacks = Stacks.parse(out.read_text().splitlines())
    per_sample = 1.0 / SAMPLE_HZ / requests
    frames = {
        thread: [("(all of the thread's samples)", stacks.total(thread) * per_sample)]
        + [(frame, count * per_sample) for frame, count in stacks.top(thread, 15)]
        for thread in sorted(stacks.samples)
    }
    client_cpu = (client_after - client_before) / requests
    return Profile(clients, requests, requests / elapsed, cpu, client_cpu, frames, out)


def render(result: Profile) -> str:
    by_cpu = sorted(result.cpu_s.items(), key=lambda item: -item[1])
    clients = "one client" if result.clients == 1 else f"{result.clients} clients"
    lines = [
        f"# Where a proxy's time goes: {clients}, raw image bodies",
        "",
        f"{result.requests} requests, {result.per_s:.1f} a second. CPU per request by thread "
        "(from /proc; threads py-spy cannot name are ONNX Runtime's own), and the load "
        "generator's, a process of its own on the same cores:",
        "",
        "| thread | CPU per request |",
        "| --- | --- |",
        *(f"| {name} | {seconds * 1000:.2f} ms |" for name, seconds in by_cpu),
        f"| all of the proxy | {sum(result.cpu_s.values()) * 1000:.2f} ms |",
        f"| the load generator | {result.client_cpu_s * 1000:.2f} ms |",
        "",
        f"Python frames each thread was in, per request (py-spy at {SAMPLE_HZ} Hz, inclusive; "
        f"stacks in `{result.stacks}` for a flame graph). py-spy counts a thread busy by its "
        "state, and cannot see inside native code (uvloop, ONNX Runtime): its totals can "
        "exceed the CPU above.",
    ]
    for thread, top in result.frames_s.items():
        lines += ["", f"**{thread}**", "", "| frame | per request |", "| --- | --- |"]
        lines += [f"| `{frame}` | {seconds * 1000:.2f} ms |" for frame, seconds in top]
    return "\n".join(lines) + "\n"
