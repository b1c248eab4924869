"""`python -m bench`: Tandem's speed and memory, as ratios taken in one run on this machine.

Phases, each against the same photo:
  floor         decode + preprocess + inference in this process, no server
  sync          POST /predict over loopback from a load generator in another process, back to
                back, and from one client pausing between requests (sporadic)
  async         jobs per second through a worker, with the proxy idle
  interference  sync latency while a worker drains a full queue, against an empty queue
  memory        peak RSS of the proxy and of a worker
Writes the table as Markdown and JSON into --out, and prints it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from bench import profile as profiling
from bench.report import render
from tandem.jobs.factory import DB_NAME
from tandem.runtime.build import BUILTIN_MODELS, build_model, is_built
from tandem.runtime.classifier import Classifier, Spin, ThreadPlan, load_classifier
from tandem.runtime.imaging import decode_image
from tandem.settings import usable_cpus

FAST, ACCURATE = "efficientnet_lite0", "efficientnet_lite2"
# The sporadic row's client, and its floor, pause 0.5 to 1.5 times this before each call.
SPORADIC_PAUSE_MS = 20.0


@dataclass
class Bench:
    model_dir: Path
    work: Path
    photo: bytes
    quick: bool
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return 0.5 if self.quick else 5.0

    @property
    def tail_seconds(self) -> float:
        """Interference compares p99s: twice the samples make them steadier."""
        return 2.0 * self.seconds


# -- floor ----------------------------------------------------------------------------------------


def _classifier(
    bench: Bench, name: str, threads: int, spin: Spin = Spin.ALWAYS, solo: int = 0
) -> Classifier:
    """With `solo` threads, a second session for solo calls, placed as the server places the
    fast model's."""
    return load_classifier(name, bench.model_dir, ThreadPlan(threads, spin, solo, pin_solo=True))


def _timed(fn: Any, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def floor(bench: Bench, name: str) -> dict[str, Any]:
    """Batch-1 latency, and the best images/s over batch sizes, threads and callers."""
    probe = FloorProbe(bench, name)
    for _ in range(5):
        probe.sample(4 if bench.quick else 10)
    return {"batch1_s": probe.latency(), "best": _best_throughput(bench, name)}


class FloorProbe:
    """Batch-1 decode + preprocess + inference: the best of ONNX Runtime's default (threads
    spinning on after a run), the server's way of spinning, and that way with the run's
    threads placed on CPUs of their own as the server places a lone call's (see
    tandem.runtime.placement), sampled in turns so that all meet the same moments of a shared
    machine."""

    def __init__(self, bench: Bench, name: str) -> None:
        placed = _classifier(bench, name, threads=1, spin=Spin.IN_RUN, solo=usable_cpus())
        ways = {
            "spinning on": (_classifier(bench, name, threads=0, spin=Spin.ALWAYS), False),
            "stopping after a run": (_classifier(bench, name, threads=0, spin=Spin.IN_RUN), False),
            "stopping after a run, placed": (placed, True),
        }
        self.calls = {}
        for way, (classifier, solo) in ways.items():
            # The server's decoding: drafted to the model's size.
            call = functools.partial(
                _classify_one, classifier, bench.photo, classifier.decode_side, solo=solo
            )
            _timed(call, 5)  # warm up
            self.calls[way] = call
        self.restart()

    def restart(self) -> None:
        """Forget the samples taken so far."""
        self.steps: dict[str, list[tuple[float, float, float]]] = {way: [] for way in self.calls}

    def sample(self, calls: int, pause_s: float = 0.0) -> None:
        """`calls` calls per way, each after a pause of 0.5 to 1.5 times `pause_s`, as the
        load generator's (bench.load)."""
        for way, call in self.calls.items():
            for _ in range(calls):
                if pause_s:
                    time.sleep(pause_s * random.uniform(0.5, 1.5))
                started = time.perf_counter()
                decode_s, inference_s = call()
                self.steps[way].append((time.perf_counter() - started, decode_s, inference_s))

    def _best(self) -> list[tuple[float, float, float]]:
        return min(self.steps.values(), key=lambda steps: float(np.median([s[0] for s in steps])))

    def latency(self) -> float:
        return float(np.median([total for total, _, _ in self._best()]))

    def split(self) -> dict[str, float]:
        """Medians of each step, for the way that gave the floor."""
        return _split_medians(self._best())


def _split_medians(steps: npt.ArrayLike) -> dict[str, float]:
    """Calls given as rows of (total, decode, inference) seconds, as the median of each step:
    preprocess is the rest of the call (in the server, with its thread hops)."""
    totals, decodes, inferences = np.asarray(steps).T
    return {
        "decode_s": float(np.median(decodes)),
        "preprocess_s": float(np.median(totals - decodes - inferences)),
        "inference_s": float(np.median(inferences)),
    }


def _classify_one(
    classifier: Classifier, photo: bytes, side: int, *, solo: bool = False
) -> tuple[float, float]:
    """Seconds spent decoding and in the model's run."""
    started = time.perf_counter()
    image = decode_image(photo, min_side=side)
    decoded = time.perf_counter() - started
    (prediction,) = classifier.predict([image], 5, solo=solo)
    return decoded, prediction.inference_ms / 1000.0


class ThroughputProbe:
    """The floor's best images/s, at the setting the floor found best, sampled in turns with
    the server's throughput it is compared with: the floor's scan, a minute earlier and the
    best of many settings, would meet other moments of a shared machine."""

    def __init__(self, bench: Bench, name: str, best: dict[str, Any]) -> None:
        self.batch, self.callers = best["batch"], best["callers"]
        self.run = _batch_call(bench, _classifier(bench, name, best["threads"]), self.batch)
        _timed(self.run, 2)  # warm up
        self.restart()

    def restart(self) -> None:
        """Forget the samples taken so far."""
        self.images, self.seconds = 0, 0.0

    def sample(self, seconds: float) -> None:
        calls, elapsed = _run_for(self.run, self.callers, seconds)
        self.images += calls * self.batch
        self.seconds += elapsed
        time.sleep(0.05)  # ONNX Runtime's threads spin a while after a run: not on the next turn

    def per_s(self) -> float:
        return self.images / self.seconds


def _batch_call(bench: Bench, classifier: Classifier, batch: int) -> Callable[[], None]:
    """Decode `batch` copies of the photo, drafted to the model's size, and classify them."""
    side = classifier.decode_side

    def run() -> None:
        classifier.predict([decode_image(bench.photo, min_side=side) for _ in range(batch)], 5)

    return run


def _run_for(run: Callable[[], None], callers: int, seconds: float) -> tuple[int, float]:
    """`callers` threads calling `run` back to back until `seconds` have passed: the calls
    made, and the seconds until the last one returned."""
    calls = [0] * callers
    started = time.perf_counter()
    stop_at = started + seconds

    def caller(index: int) -> None:
        while time.perf_counter() < stop_at:
            run()
            calls[index] += 1

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(calls), time.perf_counter() - started


def _best_throughput(bench: Bench, name: str) -> dict[str, Any]:
    """The most images/s over batch sizes, threads per run and callers at once, with every
    setting's rate under "scan". Callers count: on 2 cores two single-threaded calls side by
    side beat one call on both cores by a third (each keeps its core busy, decoding included,
    with no hand-offs inside a run), so a scan of one caller only would be no ceiling."""
    ways = sorted({1, usable_cpus()})  # as the server sizes its threads
    seconds = 0.25 if bench.quick else 0.6
    # A smoke run (--quick) scans the small batches only: on a slow day one call of the
    # accurate model on 16 images takes most of a second, and its ratios are not read.
    batches = (1, 4) if bench.quick else (1, 4, 8, 16)
    scan = []
    for threads in ways:
        classifier = _classifier(bench, name, threads)
        for batch in batches:
            run = _batch_call(bench, classifier, batch)
            _timed(run, 2)
            for callers in ways:
                calls, elapsed = _run_for(run, callers, seconds)
                setting = {"batch": batch, "threads": threads, "callers": callers}
                scan.append(setting | {"images_per_s": calls * batch / elapsed})
    best = max(scan, key=lambda setting: setting["images_per_s"])
    return best | {"scan": scan}


# -- processes ------------------------------------------------------------------------------------


class Proc:
    """`python -m tandem <command>` (or another `module`), run from `cwd`: its `tandem`
    package, then the installed."""

    def __init__(
        self,
        bench: Bench,
        command: list[str],
        log: str,
        env: dict[str, str],
        *,
        cwd: Path | None = None,
        module: str = "tandem",
    ) -> None:
        self.log_path = bench.work / log
        base = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *command],
            env=base | env,
            cwd=cwd,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def wait_for(self, text: str, timeout: float = 120.0, url: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if url is not None and _answers(url):
                return
            if url is None and text in self.log_path.read_text(errors="replace"):
                return
            if self.process.poll() is not None:
                raise RuntimeError(self.log_path.read_text()[-2000:])
            time.sleep(0.05)
        raise RuntimeError(f"timed out waiting for {text!r}")

    def peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("VmHWM"))
        return int(line.split()[1]) / 1024

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()  # a paused process would not act on SIGTERM
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _env(bench: Bench, data: Path, **extra: str) -> dict[str, str]:
    return {
        "TANDEM_MODEL_DIR": str(bench.model_dir),
        "TANDEM_DATA_DIR": str(data),
        "TANDEM_MAX_IN_FLIGHT": "1000",
        **extra,
    }


def serve(
    bench: Bench,
    data: Path,
    *args: str,
    cwd: Path | None = None,
    log: str | None = None,
    **env: str,
) -> tuple[Proc, int]:
    """Start `tandem serve` (from the tree `cwd`) on a fresh free port; returns it with the
    port. Its output goes to `log`, named by the port unless given."""
    port = _free_port()
    command = ["serve", "--port", str(port), *args]
    proc = Proc(bench, command, log or f"serve-{port}.log", _env(bench, data, **env), cwd=cwd)
    try:
        proc.wait_for("", url=f"http://127.0.0.1:{port}/health")
    except BaseException:
        proc.stop()
        raise
    return proc, port


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 (loopback)
            return bool(response.status == 200)
    except OSError:
        return False


@dataclass(frozen=True)
class Target:
    port: int
    body: Path
    content_type: str


def load(
    target: Target, concurrency: int, duration: float, requests: int = 10**9
) -> dict[str, Any]:
    return _summary(concurrency, [_generate_load(target, concurrency, duration, requests)])


def _generate_load(
    target: Target,
    concurrency: int,
    duration: float,
    requests: int,
    *,
    split: bool = False,
    pause_ms: float = 0.0,
) -> dict[str, Any]:
    """Run the load generator in its own process; its latencies and counts, and with `split`
    each answer's timings as the service measured them. With `pause_ms`, each connection
    pauses about that long before each request (see bench.load)."""
    command = [
        sys.executable,
        "-m",
        "bench.load",
        "--port",
        str(target.port),
        "--body",
        str(target.body),
        "--content-type",
        target.content_type,
        "--concurrency",
        str(concurrency),
        "--duration",
        str(duration),
        "--requests",
        str(requests),
        "--pause-ms",
        str(pause_ms),
        *(["--split"] if split else []),
    ]
    output = subprocess.run(command, capture_output=True, check=True, text=True).stdout
    raw: dict[str, Any] = json.loads(output)
    return raw


def _summary(concurrency: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = np.concatenate([run["latencies_s"] for run in runs])
    ok = sum(run["statuses"].get("200", 0) for run in runs)
    return {
        "clients": concurrency,
        "requests": len(latencies),
        "ok": ok,
        "p50_s": float(np.percentile(latencies, 50)),
        "p99_s": float(np.percentile(latencies, 99)),
        "per_s": ok / sum(run["elapsed_s"] for run in runs),
    }


def one_client_beside_the_floor(
    bench: Bench, target: Target, probe: FloorProbe, pause_ms: float = 0.0
) -> dict[str, Any]:
    """1-client latency, with the fast model's floor sampled in turns with it: the ratio of
    the two then compares the same minutes, not a quiet minute with a busy one. With
    `pause_ms`, the client and the floor both pause before each call (sporadic traffic)."""
    probe.restart()
    runs = []
    # Short turns: a neighbour's burst on a shared machine then meets both sides alike.
    for _ in range(5 if bench.quick else 20):
        probe.sample(3, pause_ms / 1000.0)
        time.sleep(0.05)  # ONNX Runtime's default lets its threads spin a while after a run
        runs.append(_generate_load(target, 1, 60.0, 15, split=True, pause_ms=pause_ms))
    return _summary(1, runs) | {
        "floor_s": probe.latency(),
        "floor_split": probe.split(),
        "split": _server_split(runs),
    }


def sixteen_clients_beside_the_floor(
    bench: Bench, target: Target, probe: ThroughputProbe
) -> dict[str, Any]:
    """16 clients' requests/s, in turns with the floor's best images/s."""
    probe.restart()
    turns = 2 if bench.quick else 4
    runs = []
    for _ in range(turns):
        probe.sample(bench.seconds / turns)
        runs.append(_generate_load(target, 16, bench.seconds / turns, 10**9))
    return _summary(16, runs) | {"floor_per_s": probe.per_s()}


def _server_split(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Where a 1-client request's time went, as medians: the steps the service timed, and
    what lies outside it (HTTP both ways, the framework and guards, the client)."""
    # Rows of latency, then the service's total, decode and inference.
    answers = np.array([answer for run in runs for answer in run["split_s"]])
    outside = answers[:, 0] - answers[:, 1]
    return _split_medians(answers[:, 1:]) | {"outside_s": float(np.median(outside))}


# -- phases ---------------------------------------------------------------------------------------


def bodies(bench: Bench) -> dict[str, tuple[Path, str]]:
    import base64

    json_body = bench.work / "body.json"
    json_body.write_text(json.dumps({"image_data": base64.b64encode(bench.photo).decode()}))
    raw_body = bench.work / "body.jpg"
    raw_body.write_bytes(bench.photo)
    return {"json": (json_body, "application/json"), "raw": (raw_body, "image/jpeg")}


def sync_path(bench: Bench, best: dict[str, Any]) -> dict[str, Any]:
    server, port = serve(bench, bench.work / "sync", "--no-worker")
    results: dict[str, Any] = {}
    # One of each for every body kind: their sessions take a while to build.
    floor_probe = FloorProbe(bench, FAST)
    best_probe = ThroughputProbe(bench, FAST, best)
    kinds = bodies(bench)
    try:
        for kind, (body, content_type) in kinds.items():
            probe = load(Target(port, body, content_type), 1, 5, requests=3)
            if probe["ok"] == 0:
                results[kind] = None  # the server does not take this kind of body
                continue
            target = Target(port, body, content_type)
            load(target, 4, 1.0)  # warm up
            results[kind] = [
                one_client_beside_the_floor(bench, target, floor_probe),
                load(target, 4, bench.seconds),
                sixteen_clients_beside_the_floor(bench, target, best_probe),
                load(target, 64, bench.seconds),
            ]
        if results.get("raw") is not None:
            raw = Target(port, *kinds["raw"])
            results["sporadic"] = one_client_beside_the_floor(
                bench, raw, floor_probe, SPORADIC_PAUSE_MS
            ) | {"pause_ms": SPORADIC_PAUSE_MS}
        results["proxy_peak_rss_mb"] = server.peak_rss_mb()
    finally:
        server.stop()
    return results


class QueueWatch:
    """Reads the queue's depth from the store while a worker drains it, costing it little:
    one read-only connection and one query per look, on the measuring process's own core
    time (opening a store per look cost the worker several percent)."""

    def __init__(self, data: Path) -> None:
        self._conn = sqlite3.connect(f"file:{data / DB_NAME}?mode=ro", uri=True)

    def depth(self) -> int:
        (n,) = self._conn.execute(
            "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')"
        ).fetchone()
        return int(n)

    def done(self) -> int:
        (n,) = self._conn.execute("SELECT COUNT(*) FROM jobs WHERE status = 'done'").fetchone()
        return int(n)

    def close(self) -> None:
        self._conn.close()


def _fill_queue(
    bench: Bench, data: Path, jobs: int, cwd: Path | None = None, log: str | None = None, **env: str
) -> None:
    """Queue `jobs` jobs in `data` through a server with no worker."""
    server, port = serve(bench, data, "--no-worker", cwd=cwd, log=log, **env)
    try:
        body, content_type = bodies(bench)["json"]
        load(Target(port, body, content_type), 4, 600, requests=jobs)
    finally:
        server.stop()


def async_path(bench: Bench, best: dict[str, Any]) -> dict[str, Any]:
    """Fill the queue with the proxy's worker off, then time a separate worker draining it, in
    turns with the accurate model's floor (the worker paused while the floor runs)."""
    data = bench.work / "async"
    # More than the turns take at the 125 jobs/s of a fast day, with lanes: an emptied queue
    # would count as the worker's slowness.
    _fill_queue(bench, data, 200 if bench.quick else 900)
    probe = ThroughputProbe(bench, ACCURATE, best)
    idle_proxy, _ = serve(bench, data, "--no-worker")
    worker = Proc(
        bench,
        ["worker", "--data-dir", str(data)],
        "worker.log",
        _env(bench, data),
    )
    watch = QueueWatch(data)
    try:
        worker.wait_for("started for model")
        worker.pause()
        jobs, seconds = 0, 0.0
        turn_s = 0.25 if bench.quick else 0.75
        for _ in range(3 if bench.quick else 6):
            probe.sample(turn_s)
            before, started = watch.done(), time.perf_counter()
            worker.resume()
            time.sleep(turn_s)
            worker.pause()
            seconds += time.perf_counter() - started
            jobs += watch.done() - before
        worker.resume()
        return {
            "jobs": jobs,
            "jobs_per_s": jobs / seconds,
            "floor_per_s": probe.per_s(),
            "queue_left": watch.depth(),
            "worker_peak_rss_mb": worker.peak_rss_mb(),
        }
    finally:
        watch.close()
        worker.stop()
        idle_proxy.stop()


def interference(bench: Bench) -> dict[str, Any]:
    """Sync latency, 1 and 4 clients: queue empty (no worker) vs the embedded worker draining a
    full one, sampled in alternating turns; and how fast that worker drains it, with the proxy
    idle and under each load.

    Both servers stay up, and the busy one is paused (SIGSTOP) while the empty one is measured,
    so neither side's turns meet the other's worker. Turns matter here because a p99 is decided
    by a handful of requests: a few seconds' stall of a shared machine, if it falls in one
    side's only phase, would decide the ratio alone.
    """
    body, content_type = bodies(bench)["json"]
    data = bench.work / "busy"
    _fill_queue(bench, data, 250 if bench.quick else 1500)
    empty, empty_port = serve(bench, bench.work / "quiet", "--no-worker")
    busy, busy_port = serve(bench, data)  # the default: the accurate model's worker in-process
    watch = QueueWatch(data)
    try:
        time.sleep(1.0)  # let the worker get going
        before, started = watch.done(), time.perf_counter()
        time.sleep(bench.seconds)
        results: dict[str, Any] = {
            "embedded_idle_jobs_per_s": _finished_per_s(watch, before, started)
        }
        empty_target = Target(empty_port, body, content_type)
        sides = Turns(empty_target, Target(busy_port, body, content_type), busy, watch)
        for clients in (1, 4):
            sides.run(bench, clients)
        results |= sides.results()
        results["queue_left"] = watch.depth()
    finally:
        watch.close()
        busy.stop()
        empty.stop()
    return results


@dataclass
class Turns:
    """Interference's two sides, sampled in alternating turns."""

    empty: Target
    full: Target
    busy: Proc
    watch: QueueWatch
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {"empty": [], "full": []})
    loaded_jobs_per_s: list[float] = field(default_factory=list)
    spreads: list[tuple[float, float]] = field(default_factory=list)  # of the p99 ratio

    def run(self, bench: Bench, clients: int) -> None:
        turns = 4 if bench.quick else 10
        seconds = bench.tail_seconds / turns
        empty, full = [], []
        done, busy_s = 0, 0.0
        for turn in range(turns):
            if turn % 2:  # each side goes first in half the turns: neither always follows a pause
                empty.append(self._empty_turn(clients, seconds))
            time.sleep(0.25)  # the worker back at work before the turn starts
            before, started = self.watch.done(), time.perf_counter()
            full.append(_generate_load(self.full, clients, seconds, 10**9))
            done += self.watch.done() - before
            busy_s += time.perf_counter() - started
            if turn % 2 == 0:
                empty.append(self._empty_turn(clients, seconds))
        self.runs["empty"].append(_summary(clients, empty))
        self.runs["full"].append(_summary(clients, full))
        self.loaded_jobs_per_s.append(done / busy_s)
        self.spreads.append(p99_ratio_spread(empty, full))

    def _empty_turn(self, clients: int, seconds: float) -> dict[str, Any]:
        self.busy.pause()
        try:
            return _generate_load(self.empty, clients, seconds, 10**9)
        finally:
            self.busy.resume()

    def results(self) -> dict[str, Any]:
        return self.runs | {
            "embedded_loaded_jobs_per_s": self.loaded_jobs_per_s,
            "p99_ratio_spread": self.spreads,
        }


def p99_ratio_spread(
    empty: list[dict[str, Any]], full: list[dict[str, Any]], draws: int = 2000
) -> tuple[float, float]:
    """The 5th and 95th percentiles of the p99 ratio full / empty over the turns drawn again
    with replacement, turn k of both sides together (they ran moments apart). A p99 of some
    700 requests is their 7 slowest, so a stall in one turn can decide it: the spread says
    how much the ratio of this run owes to which turns it happened to take."""
    rng = np.random.default_rng(0)  # the same turns give the same spread
    sides = [[np.asarray(run["latencies_s"]) for run in turns] for turns in (full, empty)]
    ratios = []
    for _ in range(draws):
        picks = rng.integers(0, len(empty), len(empty))
        full_p99, empty_p99 = (
            np.percentile(np.concatenate([s[i] for i in picks]), 99) for s in sides
        )
        ratios.append(full_p99 / empty_p99)
    low, high = np.percentile(ratios, [5, 95])
    return float(low), float(high)


def profile_proxy(bench: Bench, stacks: Path, clients: int = 1) -> str:
    """A proxy with no worker under `clients` sending raw images back to back: CPU and Python
    frames by thread, per request (see bench.profile)."""
    server, port = serve(bench, bench.work / "profile", "--no-worker")
    body, content_type = bodies(bench)["raw"]
    target = Target(port, body, content_type)
    try:
        load(target, clients, 2.0)  # warm up

        def drive(seconds: float) -> int:
            return int(load(target, clients, seconds)["requests"])

        pid = server.process.pid
        found = profiling.profile(pid, bench.tail_seconds, stacks, drive, clients)
    finally:
        server.stop()
    return profiling.render(found)


def _finished_per_s(watch: QueueWatch, before: int, started: float) -> float:
    return (watch.done() - before) / (time.perf_counter() - started)


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": __import__("onnxruntime").__version__,
    }


def command_line(description: str | None, *, quick: bool = True) -> argparse.ArgumentParser:
    """A bench command's parser, with the options the commands share."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, default=Path.home() / ".cache/tandem/models")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    if quick:
        parser.add_argument("--quick", action="store_true", help="shorter runs, for a smoke test")
    return parser


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead: where a proxy's time goes under one client (needs py-spy)",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=1,
        help="with --profile: clients sending at once (16: where the throughput goes)",
    )
    args = parser.parse_args()
    for name in BUILTIN_MODELS:
        if not is_built(name, args.model_dir):
            build_model(name, args.model_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = args.out / f"work-{stamp}"
    work.mkdir(parents=True)
    photo = bench_photo()
    bench = Bench(args.model_dir, work, photo, args.quick)
    if args.profile:
        report = profile_proxy(bench, args.out / f"profile-{stamp}.txt", args.clients)
        (args.out / f"profile-{stamp}.md").write_text(report)
        print(report)
        return
    results: dict[str, Any] = {"machine": machine(), "photo_bytes": len(photo)}
    started = time.perf_counter()
    # Each model's floor is measured just before the phase it is compared with: the speed of
    # a shared machine drifts over minutes.
    results["floor"] = {FAST: _phase("floor", lambda: floor(bench, FAST))}
    results["sync"] = _phase("sync", lambda: sync_path(bench, results["floor"][FAST]["best"]))
    results["floor"][ACCURATE] = _phase("floor", lambda: floor(bench, ACCURATE))
    results["async"] = _phase(
        "async", lambda: async_path(bench, results["floor"][ACCURATE]["best"])
    )
    results["interference"] = _phase("interference", lambda: interference(bench))
    results["duration_s"] = time.perf_counter() - started
    table = render(results)
    (args.out / f"bench-{stamp}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"bench-{stamp}.md").write_text(table)
    print(table)


def _phase(label: str, run: Any) -> Any:
    print(f"bench: {label}...", file=sys.stderr, flush=True)
    return run()


def bench_photo() -> bytes:
    """A real photo at a typical upload size: scikit-image's `chelsea`, upscaled to 1200x800."""
    import io

    from skimage import data as photos

    cat = photos.chelsea()  # type: ignore[no-untyped-call]
    image = Image.fromarray(cat).resize((1200, 800), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


if __name__ == "__main__":
    main()
