"""`python -m bench.soak`: whether a long-running `tandem serve` holds its memory, threads,
open files and disk steady under the traffic production sends it.

Starts `tandem serve` as `make serve` does (embedded worker, SQLite store), with finished jobs
kept for --ttl seconds so that the store reaches the size it keeps, and drives it at --rate
requests a second for --minutes with a mix of: JSON and raw photos of several sizes and
formats, long-polls, event streams, webhooks to a receiver here, retries under an
Idempotency-Key, cancels, and requests it must refuse. Every --every seconds it samples the
server's resident memory, threads, open files, the store's files and the queue.

The first --warm-up share of the run is left out (caches, arenas and the store fill then);
over the rest each measure is reported as its start, end, peak and least-squares slope per
hour. Any answer outside what each request expects (a 5xx above all) is counted and listed.
Writes soak.md and soak.json into --out. Each sample is also written as it is taken, to
samples.jsonl in the run's folder, so that a run killed outright leaves what it had seen;
SIGINT (Ctrl-C) or SIGTERM ends the traffic early, and the report covers the time it ran.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import secrets
import signal
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis
from PIL import Image

from bench.__main__ import Bench, Proc, _free_port, bench_photo, command_line, machine
from tandem.jobs.factory import DB_NAME
from tandem.runtime.build import BUILTIN_MODELS, build_model, is_built

# Each kind of request, with its share of the traffic.
MIX = {
    "json": 30,
    "json_then_wait": 15,
    "raw": 15,
    "events": 8,
    "webhook": 8,
    "idempotent": 8,
    "cancel": 6,
    "refused": 10,
}
WATCH_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Photo:
    data: bytes
    content_type: str


def photos() -> list[Photo]:
    """The bench's cat at several sizes and formats: decoding buffers of every size."""
    cat = Image.open(io.BytesIO(bench_photo()))
    shapes = [
        ((1200, 800), "JPEG"),
        ((4000, 2667), "JPEG"),
        ((320, 213), "PNG"),
        ((640, 427), "PNG"),
    ]
    out = []
    for size, kind in shapes:
        buffer = io.BytesIO()
        cat.resize(size).save(buffer, kind)
        out.append(Photo(buffer.getvalue(), f"image/{kind.lower()}"))
    return out


@dataclass
class Tally:
    """What the traffic saw: answers per kind and status, and those it did not expect, with
    the first body of each."""

    answers: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    overrun: int = 0  # requests not sent: as many were still in flight as the cap allows
    webhooks: int = 0

    def saw(self, kind: str, answer: httpx.Response, expected: tuple[int, ...]) -> bool:
        key = f"{kind} {answer.status_code}"
        self.answers[key] += 1
        if answer.status_code in expected:
            return True
        self.unexpected[key] += 1
        self.examples.setdefault(key, answer.text[:300])
        return False

    def as_dict(self) -> dict[str, Any]:
        return {  # not dataclasses.asdict, which would rebuild each Counter from its pairs
            "answers": dict(self.answers),
            "unexpected": dict(self.unexpected),
            "examples": self.examples,
            "overrun": self.overrun,
            "webhooks": self.webhooks,
        }


class Traffic:
    """Requests of every kind in MIX at a steady rate, each on its own task."""

    def __init__(
        self, client: httpx.AsyncClient, photos: list[Photo], hook_url: str, tally: Tally
    ) -> None:
        self.client, self.photos, self.hook_url, self.tally = client, photos, hook_url, tally

    async def run(self, rate: float, seconds: float, stop: asyncio.Event, cap: int = 64) -> None:
        tasks: set[asyncio.Task[None]] = set()
        names, weights = list(MIX), list(MIX.values())
        deadline = time.monotonic() + seconds
        while (now := time.monotonic()) < deadline and not stop.is_set():
            if len(tasks) < cap:
                kind = random.choices(names, weights)[0]
                task = asyncio.create_task(self._one(kind))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            else:
                self.tally.overrun += 1
            await asyncio.sleep(max(0.0, 1 / rate - (time.monotonic() - now)))
        await asyncio.gather(*tasks)

    async def _one(self, kind: str) -> None:
        try:
            send: Callable[[], Awaitable[None]] = getattr(self, kind)  # a method per MIX key
            await send()
        except httpx.HTTPError as exc:
            self.tally.unexpected[f"{kind} {type(exc).__name__}"] += 1

    async def _post(self, kind: str, photo: Photo | None = None, **options: Any) -> str | None:
        """The job's id, if one was queued."""
        photo = photo or random.choice(self.photos)
        body = {"image_data": base64.b64encode(photo.data).decode()}
        answer = await self.client.post("/predict", json=body, **options)
        if not self.tally.saw(kind, answer, (200,)):
            return None
        job_id: str | None = answer.json()["job_id"]
        return job_id

    async def json(self) -> None:
        await self._post("json")

    async def json_then_wait(self) -> None:
        if (job := await self._post("json_then_wait")) is None:
            return
        answer = await self.client.get(f"/job/{job}", params={"wait": 30})
        self.tally.saw("wait", answer, (200,))

    async def raw(self) -> None:
        photo = random.choice(self.photos)
        headers = {"Content-Type": photo.content_type}
        answer = await self.client.post("/predict", content=photo.data, headers=headers)
        self.tally.saw("raw", answer, (200,))

    async def events(self) -> None:
        if (job := await self._post("events")) is None:
            return
        async with self.client.stream("GET", f"/job/{job}/events") as stream:
            if stream.status_code == 200:
                async for _ in stream.aiter_lines():
                    pass  # the server ends the stream at the job's last state
            else:
                await stream.aread()
            self.tally.saw("stream", stream, (200,))

    async def webhook(self) -> None:
        await self._post("webhook", params={"callback_url": self.hook_url})

    async def idempotent(self) -> None:
        headers = {"Idempotency-Key": secrets.token_hex(8)}
        photo = random.choice(self.photos)
        first = await self._post("idempotent", photo, headers=headers)
        again = await self._post("idempotent", photo, headers=headers)
        if first != again:
            self.tally.unexpected["idempotent: a second job"] += 1

    async def cancel(self) -> None:
        if (job := await self._post("cancel")) is None:
            return
        answer = await self.client.delete(f"/job/{job}")
        self.tally.saw("cancel", answer, (200, 409))  # 409: it finished first

    async def refused(self) -> None:
        tries: list[tuple[str, str, dict[str, Any], int]] = [
            ("POST", "/predict", {"json": {"image_data": "not base64!"}}, 422),
            ("POST", "/predict", {"content": b"\xff\xd8 not a photo", "headers": _JPEG}, 422),
            ("GET", f"/job/{secrets.token_hex(16)}", {}, 404),
            ("GET", "/job/not-an-id", {}, 404),
        ]
        method, path, options, status = random.choice(tries)
        answer = await self.client.request(method, path, **options)
        self.tally.saw("refused", answer, (status,))


_JPEG = {"Content-Type": "image/jpeg"}


async def receive_webhooks(tally: Tally) -> tuple[asyncio.Server, int]:
    """A webhook receiver on a free loopback port that answers 204 to every POST."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                tally.webhooks += 1
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@dataclass(frozen=True)
class Sample:
    at_s: float
    measures: dict[str, float]


def process_measures(name: str, pid: int) -> dict[str, float]:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {
        f"{name} RSS MB": int(status["VmRSS"].split()[0]) / 1024,
        f"{name} threads": int(status["Threads"]),
        f"{name} open files": len(os.listdir(f"/proc/{pid}/fd")),
    }


def files_mb(paths: Iterable[Path]) -> float:
    return sum(path.stat().st_size for path in paths if path.is_file()) / 2**20


class Unsampled(Exception):
    """A measure the system did not give this time; the sample is skipped and counted."""


def queue_length(port: int) -> float:
    """`tandem_queue_length` from the proxy's /metrics: the same reading on either store."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        return queue_length_in(answer.read().decode())


def queue_length_in(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("tandem_queue_length "):
            return float(line.split()[1])
    # /metrics leaves the store's readings out while the store does not answer.
    raise Unsampled("no tandem_queue_length on /metrics: the store was away")


class System:
    """What the soak runs and watches: started on a port, sampled, stopped."""

    title = ""

    def __init__(self, bench: Bench, env: dict[str, str]) -> None:
        self.bench, self.data = bench, bench.work / "data"
        # Proc adds this process's environment, less any TANDEM_ setting of its own.
        self.env = env | {
            "TANDEM_MODEL_DIR": str(bench.model_dir),
            "TANDEM_DATA_DIR": str(self.data),
        }
        self.port = _free_port()
        self.proc: Proc | None = None

    def start(self) -> None:
        self.proc = Proc(self.bench, self.command(), "server.log", self.env)
        self.proc.wait_for("", url=f"http://127.0.0.1:{self.port}/health")

    def command(self) -> list[str]:
        raise NotImplementedError

    def measures(self) -> dict[str, float]:
        raise NotImplementedError

    def sample(self, started: float) -> Sample:
        measures = self.measures() | {"queue length": queue_length(self.port)}
        return Sample(time.monotonic() - started, measures)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def tracebacks(self) -> int:
        assert self.proc is not None
        return self.proc.log_path.read_text(errors="replace").count("Traceback")


class Embedded(System):
    title = "`tandem serve` (embedded worker, SQLite)"

    def command(self) -> list[str]:
        return ["serve", "--port", str(self.port)]

    def measures(self) -> dict[str, float]:
        assert self.proc is not None
        out = process_measures("server", self.proc.process.pid)
        # The WAL apart: its file keeps the size of its busiest spell, up to a cap of its own
        # (tandem.jobs.sqlite.upkeep), where the database file is what the kept jobs take.
        database = self.data / DB_NAME
        return out | {
            "store file MB": files_mb([database]),
            "store WAL MB": files_mb([database.with_name(f"{DB_NAME}-wal")]),
        }


class Distributed(System):
    title = "`tandem up` (redis-server, a proxy, 2 workers)"

    def command(self) -> list[str]:
        return ["up", "--port", str(self.port), "--workers", "2"]

    def start(self) -> None:
        super().start()
        assert self.proc is not None
        self.children = children_named(self.proc.process.pid)
        # The URL `tandem up` gave its proxy, which keeps it out of its command line.
        environ = Path(f"/proc/{self.children['proxy']}/environ").read_bytes().split(b"\0")
        url = next(v for v in environ if v.startswith(b"TANDEM_REDIS_URL=")).split(b"=", 1)[1]
        self.redis_url = url.decode()

    def measures(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, pid in self.children.items():
            out |= process_measures(name, pid)
        with redis.Redis.from_url(self.redis_url) as client:  # a connection per sample
            out["redis used MB"] = client.info("memory")["used_memory"] / 2**20
            out["redis keys"] = client.dbsize()
        return out | {"redis files MB": files_mb((self.data / "redis").rglob("*"))}


def children_named(parent: int) -> dict[str, int]:
    """`tandem up`'s children by role: redis, proxy, worker1, ..."""
    found: dict[str, int] = {}
    pids = sorted(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    for pid in pids:
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except (OSError, IndexError):
            continue  # gone meanwhile
        if ppid != parent:
            continue
        if "redis-server" in argv[0]:  # its title, which redis-server sets to its address
            found["redis"] = pid
        elif "serve" in argv:
            found["proxy"] = pid
        else:
            found[f"worker{sum(k.startswith('worker') for k in found) + 1}"] = pid
    return found


class Samples(list[Sample]):
    """The samples taken, each also appended to a JSON-lines file as it is taken."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def take(self, system: System, started: float) -> None:
        sample = system.sample(started)
        self.append(sample)
        with self.path.open("a") as f:
            f.write(json.dumps(asdict(sample)) + "\n")


async def sample_every(
    system: System, every: float, started: float, into: Samples, tally: Tally
) -> None:
    while True:
        try:
            await asyncio.to_thread(into.take, system, started)
        except (OSError, Unsampled) as exc:  # a process or store gone: said, and the run goes on
            tally.unexpected[f"sampling: {exc!r}"] += 1
        await asyncio.sleep(every)


def stopped_by_signals() -> asyncio.Event:
    """Set by SIGINT or SIGTERM: the traffic ends early, and the run is reported. A second
    signal acts as it would have (Ctrl-C twice stops the soak at once)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    ends = (signal.SIGINT, signal.SIGTERM)

    def end() -> None:
        stop.set()
        for signum in ends:
            loop.remove_signal_handler(signum)

    for signum in ends:
        loop.add_signal_handler(signum, end)
    return stop


def growth(samples: list[Sample], warm_up: float) -> dict[str, dict[str, float]]:
    """Per measure, over the samples after the warm-up: start, end, peak, slope per hour."""
    cut = samples[-1].at_s * warm_up
    kept = [s for s in samples if s.at_s >= cut]
    hours = np.array([s.at_s for s in kept]) / 3600
    out = {}
    for name in kept[0].measures:
        values = np.array([s.measures[name] for s in kept], dtype=float)
        slope = float(np.polyfit(hours, values, 1)[0]) if len(kept) > 1 else 0.0
        out[name] = {
            "start": float(values[0]),
            "end": float(values[-1]),
            "peak": float(values.max()),
            "slope_per_hour": slope,
        }
    return out


def markdown(report: dict[str, Any]) -> str:
    run = report["run"]
    lines = [
        f"{run['system']}, {run['minutes']:g} min at {run['rate']:g} requests/s, jobs kept"
        f" {run['ttl_s']:g} s; {report['machine']['cpu']}, {report['machine']['cores']}"
        f" cores. Measured after the first {run['warm_up']:.0%} of the run.",
        "",
        "| measure | start | end | peak | slope per hour |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, g in report["growth"].items():
        lines.append(
            f"| {name} | {g['start']:.1f} | {g['end']:.1f} | {g['peak']:.1f}"
            f" | {g['slope_per_hour']:+.1f} |"
        )
    tally = report["tally"]
    lines += [
        "",
        f"Answers: {sum(tally['answers'].values())}; webhooks received: {tally['webhooks']};"
        f" requests not sent (64 in flight): {tally['overrun']}.",
        "Unexpected: "
        + (", ".join(f"{k}: {v}" for k, v in sorted(tally["unexpected"].items())) or "none")
        + ".",
        f"Tracebacks in the server's log: {report['tracebacks']}.",
    ]
    return "\n".join(lines) + "\n"


async def soak(
    make: Callable[[Bench, dict[str, str]], System],
    bench: Bench,
    args: argparse.Namespace,
) -> tuple[System, list[Sample], Tally]:
    tally = Tally()
    receiver, hook_port = await receive_webhooks(tally)
    env = {
        "TANDEM_RESULT_TTL_S": str(args.ttl),
        "TANDEM_WEBHOOK_HOSTS": f"127.0.0.1:{hook_port}",
        "TANDEM_WEBHOOK_SECRET": secrets.token_hex(16),
    }
    system = make(bench, env)
    samples = Samples(bench.work / "samples.jsonl")
    try:
        await asyncio.to_thread(system.start)
        started = time.monotonic()
        sampler = asyncio.create_task(sample_every(system, args.every, started, samples, tally))
        base = f"http://127.0.0.1:{system.port}"
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=base, timeout=WATCH_TIMEOUT_S, limits=limits) as c:
            traffic = Traffic(c, photos(), f"http://127.0.0.1:{hook_port}/hook", tally)
            await traffic.run(args.rate, args.minutes * 60, stopped_by_signals())
        sampler.cancel()
        await asyncio.to_thread(samples.take, system, started)
    finally:
        await asyncio.to_thread(system.stop)
        receiver.close()
    return system, samples, tally


def main() -> None:
    parser = command_line(__doc__, quick=False)
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--rate", type=float, default=20.0, help="requests a second")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--ttl", type=float, default=120.0, help="seconds jobs are kept")
    parser.add_argument("--warm-up", type=float, default=0.2, help="share left out")
    parser.add_argument(
        "--up", action="store_true", help="soak `tandem up` (Redis) instead of `tandem serve`"
    )
    args = parser.parse_args()
    for name in BUILTIN_MODELS:
        if not is_built(name, args.model_dir):
            build_model(name, args.model_dir)
    work = args.out / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    work.mkdir(parents=True)
    bench = Bench(args.model_dir, work, bench_photo(), quick=False)
    make = Distributed if args.up else Embedded
    system, samples, tally = asyncio.run(soak(make, bench, args))
    report = {
        "machine": machine(),
        "run": {
            "system": system.title,
            "minutes": round(samples[-1].at_s / 60, 2),  # less than asked, if interrupted
            "rate": args.rate,
            "ttl_s": args.ttl,
            "warm_up": args.warm_up,
        },
        "growth": growth(samples, args.warm_up),
        "tally": tally.as_dict(),
        "tracebacks": system.tracebacks(),
        "samples": [asdict(s) for s in samples],
    }
    text = markdown(report)
    name = "soak-up" if args.up else "soak"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(text)
    print(text)
    sys.exit(1 if tally.unexpected or report["tracebacks"] else 0)


if __name__ == "__main__":
    main()
