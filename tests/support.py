"""Test helpers: tiny ONNX classifiers the tests generate, and a real `tandem serve` process."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import random
import shutil
import signal
import socket
import sqlite3
import ssl
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
import numpy as np
import onnx
import trustme
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from tandem.jobs.records import Claim
from tandem.jobs.store import JobStore
from tandem.predictions import Prediction, Scored
from tandem.runtime.manifest import ModelManifest, Output, Preprocess, sha256_of
from tandem.runtime.priority import Occupancy

# A model's answer, for tests that store one and care only that it is there.
ANSWER = Prediction("m", (Scored(1, "one", 0.9),), 1.0)

# -- images ------------------------------------------------------------------------------------


def encode(image: Image.Image | np.ndarray, fmt: str = "JPEG", **options: Any) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """An image of random pixels: one that compresses as little as a photo's detail."""
    pixels = np.random.default_rng(3).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def progressive_jpeg(image: Image.Image, extra_scans: int = 0, **options: Any) -> bytes:
    """A progressive JPEG with its last scan written `extra_scans` more times.

    Each copy is a valid scan that costs a few dozen bytes and the decoder a pass over the
    image: the shape of the known progressive-scan attack on libjpeg (LJT-01-003).
    """
    data = encode(image, "JPEG", progressive=True, **options)
    # The last scan runs to EOI, and 0xFFDA never occurs inside coded data.
    last_scan = data[data.rindex(b"\xff\xda") : -2]
    return data[:-2] + last_scan * extra_scans + data[-2:]


def png_chunk(kind: bytes, body: bytes = b"") -> bytes:
    """One PNG chunk: length, type, data and CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width`x`height` RGB pixels and holds none: a pixel bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND")


def rle_bmp(width: int, height: int) -> bytes:
    """An 8-bit BMP compressed with RLE8 (Pillow writes none): runs of two grey pixels."""
    row = b"\x02\x80" * (width // 2) + b"\x00\x00"  # end of line
    pixels = row * height + b"\x00\x01"  # end of bitmap
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 0, 0, 256, 0)
    offset = 14 + len(info) + len(palette)
    header = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
    return header + info + palette + pixels


def cut_tiff() -> bytes:
    """A TIFF that ends 40 bytes into its directory (written last, as Pillow writes it):
    Pillow reads the tags it can, and libtiff, reading the file again, reports it broken."""
    return encode(noise(64, 48), "TIFF", compression="tiff_lzw")[:-40]


def fill(disk: Path, leaving: int) -> Path:
    """A file taking all but `leaving` bytes of the disk's free space."""
    filler = disk / "filler"
    filler.write_bytes(b"\0" * max(shutil.disk_usage(disk).free - leaving, 0))
    return filler


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> Image.Image:
    return Image.new("RGB", size, colour)


# -- stored jobs ------------------------------------------------------------------------------


def overwrite_meta(db: Path, meta: str, job_id: str | None = None) -> None:
    """Overwrite jobs' stored metadata in a SQLite store behind its back, as a newer version
    of Tandem (or a fault) would leave it: one job's, or every job's."""
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE jobs SET meta = ? WHERE ? IS NULL OR id = ?", (meta, job_id, job_id))


# -- tiny models -------------------------------------------------------------------------------


@dataclass
class TinySpec:
    """A model whose top class is chosen by the image's dominant colour channel.

    logits = mean_over_pixels(input) @ weights + bias, where input channel c votes for class
    `votes[c]`. A huge bias on `background_index` checks that a background output is skipped.
    """

    name: str
    size: int
    layout: str = "NCHW"
    classes: int = 10
    votes: tuple[int, int, int] = (1, 2, 3)
    background_index: int | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)
    # Scores of NaN for an image with more blue than red, as a broken model's might be.
    nan_when_blue: bool = False
    # The graph's input, where it differs from what the manifest says: a batch size fixed
    # (as an export without dynamic axes leaves it), another side, channels or element type.
    batch: int | None = None
    graph_size: int | None = None
    any_side: bool = False  # a symbolic side, as a fully convolutional export leaves it
    # With any_side: the side a layer inside fixes all the same, by adding a tensor of that
    # side to the image, as a vision transformer's position embedding does.
    fixed_inside: int | None = None
    channels: int = 3
    input_type: int = TensorProto.FLOAT
    # Inputs the graph declares besides the image (never used).
    extra_inputs: tuple[str, ...] = ()
    # Logits as a convolutional head leaves them, [N, classes, 1, 1] (SqueezeNet's).
    feature_map: bool = False
    # The layout the manifest says, where it is not the graph's.
    manifest_layout: str | None = None
    # An output before the logits, as a model that also gives its features has: the
    # channel means, [N, 3]. The manifest then names the logits by `output_name`.
    features_first: bool = False
    output_name: str | None = None


def tiny_model(directory: Path, spec: TinySpec) -> Path:
    """Write `<name>.onnx` and its manifest.json into `directory`; return the manifest path."""
    directory.mkdir(parents=True, exist_ok=True)
    side: int | str = spec.graph_size or spec.size
    if spec.any_side:
        side = "side"
    shape = (
        [spec.batch, spec.channels, side, side]
        if spec.layout == "NCHW"
        else [spec.batch, side, side, spec.channels]
    )
    axes = [2, 3] if spec.layout == "NCHW" else [1, 2]
    weights = np.zeros((spec.channels, spec.classes), dtype=np.float32)
    for channel, cls in enumerate(spec.votes[: spec.channels]):
        weights[channel, cls] = 10.0
    bias = np.zeros(spec.classes, dtype=np.float32)
    if spec.background_index is not None:
        bias[spec.background_index] = 1000.0
    cast = "cast" if spec.fixed_inside else "pixels"
    nodes = [
        helper.make_node("Cast", ["image"], [cast], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels"], ["pooled"], axes=axes, keepdims=0),
        helper.make_node("MatMul", ["pooled", "w"], ["scores"]),
        helper.make_node("Add", ["scores", "b"], ["biased" if spec.nan_when_blue else "flat"]),
    ]
    initializers = [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")]
    if spec.fixed_inside:
        nodes.insert(1, helper.make_node("Add", ["cast", "position"], ["pixels"]))
        initializers.append(_position_embedding(spec, spec.fixed_inside))
    if spec.nan_when_blue:  # + 0 * sqrt(red - blue): NaN where blue wins
        nodes += [
            helper.make_node("MatMul", ["pooled", "red_less_blue"], ["margin"]),
            helper.make_node("Sqrt", ["margin"], ["root"]),
            helper.make_node("Mul", ["root", "zero"], ["nothing_or_nan"]),
            helper.make_node("Add", ["biased", "nothing_or_nan"], ["flat"]),
        ]
        initializers += [
            numpy_helper.from_array(np.array([[1], [0], [-1]], np.float32), "red_less_blue"),
            numpy_helper.from_array(np.zeros(1, np.float32), "zero"),
        ]
    logits = [spec.batch, spec.classes]
    if spec.feature_map:
        nodes.append(helper.make_node("Unsqueeze", ["flat", "map_axes"], ["logits"]))
        initializers.append(numpy_helper.from_array(np.array([2, 3], np.int64), "map_axes"))
        logits += [1, 1]
    else:
        nodes.append(helper.make_node("Identity", ["flat"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        spec.name,
        [
            helper.make_tensor_value_info("image", spec.input_type, shape),
            *(
                helper.make_tensor_value_info(name, TensorProto.FLOAT, [1])
                for name in spec.extra_inputs
            ),
        ],
        [
            *(
                [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [spec.batch, 3])]
                if spec.features_first
                else []
            ),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, logits),
        ],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx_path = directory / f"{spec.name}.onnx"
    onnx.save(model, onnx_path)
    labels = tuple(f"class {i}" for i in range(spec.classes))
    if spec.background_index is not None:
        labels = tuple(
            "background" if i == spec.background_index else f"class {i}"
            for i in range(spec.classes)
        )
    manifest = ModelManifest(
        name=spec.name,
        file=onnx_path.name,
        sha256=sha256_of(onnx_path),
        preprocess=Preprocess(
            size=spec.size, layout=spec.manifest_layout or spec.layout, **spec.preprocess
        ),
        output=Output(name=spec.output_name, kind="logits", background_index=spec.background_index),
        labels=labels,
        source={"generated_by": "tests/support.py"},
    )
    manifest_path = directory / "manifest.json"
    manifest_path.write_text(manifest.to_json(), "utf-8")
    return manifest_path


def _position_embedding(spec: TinySpec, side: int) -> TensorProto:
    """Zeros of one image's shape at `side`: adding them leaves the pixels, but fixes the side."""
    shape = (
        (1, spec.channels, side, side) if spec.layout == "NCHW" else (1, side, side, spec.channels)
    )
    return numpy_helper.from_array(np.zeros(shape, np.float32), "position")


def record_runs(session: Any, name: str, log: list[str]) -> None:
    """Log `name` each time this ONNX Runtime session runs."""
    run = session.run

    def recorded(*args: Any, **kwargs: Any) -> Any:
        log.append(name)
        return run(*args, **kwargs)

    session.run = recorded


# -- a real server -----------------------------------------------------------------------------


def python_output(code: str, *args: str, timeout: float = 60.0) -> str:
    """What `python -c code args` prints in a process of its own, which must exit 0: for what
    only a fresh interpreter shows (its resident memory, the modules it imports)."""
    run = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout,
    )
    return run.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_cluster_port() -> int:
    """A free port for a Redis Cluster node: at most 55535, with the port 10000 above it (its
    cluster bus) free too. A port the system picks is often above that, and the node then
    refuses to start."""
    while True:
        port = random.randint(20000, 55535)
        with socket.socket() as sock, socket.socket() as bus:
            try:
                sock.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """A response's status line, and its headers by lower-case name."""
    status, *lines = head.decode("latin-1").split("\r\n")
    return status, {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


def read_response(sock: socket.socket) -> tuple[str, dict[str, str], bytes]:
    """The next response on `sock`: its status line, headers, and body up to its length."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, headers = parse_head(head)
    while len(body) < int(headers.get("content-length", 0)) and (chunk := sock.recv(65536)):
        body += chunk
    return status, headers, body


def exchange(port: int, raw: bytes) -> tuple[str, dict[str, str], bytes]:
    """The first response to `raw`, sent on a connection of its own."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(raw)
        return read_response(sock)


def clean_env(**tandem: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    env.update({f"TANDEM_{k.upper()}": v for k, v in tandem.items()})
    return env


def tiny_env(tiny_dir: Path, data_dir: Path, **tandem: str) -> dict[str, str]:
    """clean_env for a server on the tiny models, its store in `data_dir`."""
    return clean_env(
        model_dir=str(tiny_dir),
        data_dir=str(data_dir),
        fast_model="tiny_fast",
        accurate_model="tiny_accurate",
        **tandem,
    )


class ServerProcess:
    """`python -m tandem serve` on a free port, driven over real HTTP."""

    def __init__(self, log_path: Path, env: dict[str, str], *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.verify: ssl.SSLContext | bool = True  # for a server speaking HTTPS
        self.log_path = log_path
        self.env = env
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        self.preexec: Callable[[], None] | None = None  # run in the child before it starts

    def command(self) -> list[str]:
        return [sys.executable, "-m", "tandem", "serve", "--port", str(self.port), *self.args]

    def ready(self) -> bool:
        try:
            health = httpx.get(f"{self.url}/health", timeout=1.0, verify=self.verify)
            return health.status_code == 200
        except httpx.HTTPError:
            return False

    def start(self, timeout: float = 90.0) -> Self:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command(),
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=self.preexec,  # noqa: PLW1509 (setrlimit only, before exec)
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"exited with {self.process.returncode}: {self.log()}")
            if self.ready():
                return self
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"not ready in {timeout}s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash or an OOM kill."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> int | None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode if self.process else None

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0, verify=self.verify)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)


class WorkerProcess(ServerProcess):
    """`python -m tandem worker`; started once it logs that its model is loaded."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "tandem", "worker", *self.args]

    def ready(self) -> bool:
        # The whole log: a worker with jobs waiting scrolls its start line out of `log()` fast.
        return "started for model" in self.log_path.read_text(errors="replace")


class UpProcess(ServerProcess):
    """`python -m tandem up`: redis-server, a proxy on `port` and workers; started once the
    proxy says its models and queue are ready."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "tandem", "up", "--port", str(self.port), *self.args]

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health/all", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False


def wait_for_job(client: httpx.Client, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll until the job is final; the tests' equivalent of a patient client."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/job/{job_id}").json()
        if body["status"] in ("done", "failed"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not final after {timeout}s: {body}")


# -- a real Redis ------------------------------------------------------------------------------


class RedisServer:
    """A `redis-server` of the tests' own on a free port, so they can kill and restart it.
    Given a CA, it speaks TLS alone, with a certificate the CA issued, and takes only clients
    with one too; `url` carries the client's."""

    def __init__(
        self,
        directory: Path,
        *,
        appendonly: bool = True,
        tls: trustme.CA | None = None,
        options: tuple[str, ...] = (),
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.options = options  # more of redis-server's own, as `--name value` pairs
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = directory
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self.tls: list[str] = []
        self.client_tls: ssl.SSLContext | None = None
        if tls is not None:
            self._speak_tls(tls)

    def _speak_tls(self, ca: trustme.CA) -> None:
        files = {name: str(self.directory / f"{name}.pem") for name in ("ca", "server", "client")}
        ca.cert_pem.write_to_path(files["ca"])
        for name in ("server", "client"):
            issued = ca.issue_cert("127.0.0.1")
            issued.private_key_and_cert_chain_pem.write_to_path(files[name])
        self.tls = ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "yes"]
        self.tls += ["--tls-replication", "yes"]  # a replica's link, and Sentinel's, too
        for option, name in (("cert", "server"), ("key", "server"), ("ca-cert", "ca")):
            self.tls += [f"--tls-{option}-file", files[name]]
        query = f"ssl_ca_certs={files['ca']}&ssl_certfile={files['client']}"
        self.url = f"rediss://127.0.0.1:{self.port}/0?{query}"
        self.client_tls = ssl.create_default_context(cafile=files["ca"])
        self.client_tls.load_cert_chain(files["client"])

    def _pong(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
            tls = self.client_tls
            sock = raw if tls is None else tls.wrap_socket(raw, server_hostname="127.0.0.1")
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")

    def start(self, timeout: float = 20.0) -> Self:
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self._pong():
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def command(self) -> list[str]:
        return [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--maxmemory",  # as production's should be: Tandem warns of a Redis without
            "1gb",
            "--repl-diskless-sync-delay",  # a replica is sent its data at once, not after 5 s
            "0",
            *self.tls,  # its --port 0 after the first: no plain port
            *self.options,
        ]

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def pause(self) -> None:
        """Hang it: connections stay open and nothing is answered, as across a partition."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.resume()  # a stopped process would not act on SIGTERM
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # it may refuse, as while writing its AOF
                self.kill()


class RedisSentinel(RedisServer):
    """A `redis-server --sentinel` of the tests' own, watching `primary` as the service
    `service`, alone in its quorum, quick to call a failover."""

    def __init__(
        self,
        directory: Path,
        primary: RedisServer,
        service: str = "jobs",
        tls: trustme.CA | None = None,
    ) -> None:
        super().__init__(directory, tls=tls)
        self.service = service
        self.config = directory / "sentinel.conf"  # Sentinel rewrites it as it learns
        tls_lines = "".join(
            f"{name.removeprefix('--')} {value}\n"
            for name, value in zip(self.tls[::2], self.tls[1::2], strict=True)
        )
        self.config.write_text(
            f"port {self.port}\n{tls_lines}bind 127.0.0.1\ndir {directory}\n"
            f"sentinel monitor {service} 127.0.0.1 {primary.port} 1\n"
            f"sentinel down-after-milliseconds {service} 500\n"
            f"sentinel failover-timeout {service} 5000\n"
        )

    def command(self) -> list[str]:
        return ["redis-server", str(self.config), "--sentinel"]


# -- pushed events -----------------------------------------------------------------------------


def server_sent_events(response: httpx.Response) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of a text/event-stream response, comments skipped."""
    event, data = "message", []
    for line in response.iter_lines():
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def metric(text: str, name: str) -> float:
    """The value of one unlabelled sample in Prometheus text format."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no sample {name}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- the fast path's calls -------------------------------------------------------------------------


@contextmanager
def fast_call_in_flight(calls: Occupancy) -> Iterator[threading.Event]:
    """A fast call held on another thread until the yielded event is set."""
    inside, leave = threading.Event(), threading.Event()

    def call() -> None:
        with calls.held():
            inside.set()
            leave.wait(timeout=10)

    thread = threading.Thread(target=call)
    thread.start()
    assert inside.wait(timeout=10)
    try:
        yield leave
    finally:
        leave.set()
        thread.join(timeout=10)


async def claim_told_to_stop(store: JobStore, after_s: float, within_s: float) -> list[Claim]:
    """What a claim that waits up to 30 s returns when told to stop `after_s` into its wait;
    it must return within `within_s` of that."""
    until = asyncio.Event()
    waiting = asyncio.create_task(store.claim("w", 1, 30.0, until=until))
    await asyncio.sleep(after_s)
    until.set()
    return await asyncio.wait_for(waiting, within_s)
