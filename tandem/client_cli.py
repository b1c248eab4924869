"""`tandem predict IMAGE...`: the client on the command line, for people and for scripts.
An IMAGE of `-` is read from standard input.

Exit codes: 0 every image answered (and, with --wait, every accurate answer arrived);
1 the server refused an image (bad or unsupported file: a 4xx); 3 the server could not be
reached, failed (5xx), or stayed too busy to take an image (429) through the client's
retries; 4 --wait ran out, or a job failed. 2 is argparse's usage error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from tandem.client import DEFAULT_URL, UNSENDABLE_KEY, Client, FastResult, JobResult
from tandem.errors import TandemError, TooManyRequests, UnreadableFile
from tandem.jobs.records import JobStatus
from tandem.keys import sendable
from tandem.predictions import Prediction

EXIT_OK, EXIT_REFUSED, EXIT_SERVER, EXIT_UNFINISHED = 0, 1, 3, 4
STDIN = "-"


@dataclass
class Outcome:
    """What happened to one image, in the order a script reads it."""

    image: str
    fast: FastResult | None = None
    job: JobResult | None = None
    error: TandemError | None = None
    exit_code: int = EXIT_OK
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "fast": _answer(self.fast.fast) if self.fast else None,
            "job_id": self.fast.job_id if self.fast else None,
            "status": str(self.job.status) if self.job else None,
            "accurate": _answer(self.job.accurate) if self.job and self.job.accurate else None,
            "changed": self.job.changed if self.job else None,
            "error": {"code": self.error.code, "message": self.error.message}
            if self.error
            else None,
            "notes": self.notes,
        }

    def to_text(self) -> str:
        if self.error is not None:
            return f"{self.image}: error {self.error.code}: {self.error.message}"
        assert self.fast is not None
        text = f"{self.image}: fast {_label(self.fast.fast)}"
        if self.job is not None and self.job.accurate is not None:
            mark = " (changed)" if self.job.changed else " (same)"
            text += f" -> accurate {_label(self.job.accurate)}{mark}"
        elif self.fast.job_id:
            status = self.job.status if self.job else JobStatus.QUEUED
            text += f"; job {self.fast.job_id} {status}"
        return "; ".join([text, *self.notes])


def _answer(prediction: Prediction) -> dict[str, Any]:
    return {
        "model": prediction.model,
        "label": prediction.label,
        "probability": prediction.probability,
    }


def _label(prediction: Prediction) -> str:
    return f"{prediction.label} ({prediction.probability:.2f})"


def add_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], environ: dict[str, str]
) -> None:
    predict = commands.add_parser(
        "predict",
        help="send images to a running server and print both answers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    predict.add_argument(
        "--url",
        type=_server_url,
        default=environ.get("TANDEM_URL", DEFAULT_URL),
        help=f"the server (TANDEM_URL, else {DEFAULT_URL})",
    )
    predict.add_argument(
        "--api-key", type=_api_key, default=environ.get("TANDEM_API_KEY"), help="(TANDEM_API_KEY)"
    )
    predict.add_argument(
        "--wait",
        type=float,
        nargs="?",
        const=60.0,
        default=None,
        metavar="SECONDS",
        help="also wait for the accurate answers (default 60 s when given without a value)",
    )
    predict.add_argument(
        "--idempotent",
        action="store_true",
        help="send each image with an Idempotency-Key made from its content, so that running "
        "the command again (after an interruption, say) gets the same jobs back, not new ones",
    )
    predict.add_argument("--json", action="store_true", help="one JSON object per image and line")
    predict.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar on stderr (default: when several images go to a terminal)",
    )
    predict.set_defaults(handler=run)


def _server_url(value: str) -> str:
    """An http(s) URL, checked here (exit 2) rather than as every image's unreachable server."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"not an http:// or https:// URL: {value!r}")
    return value


def _api_key(value: str) -> str:
    if not sendable(value):  # the message never shows the key
        raise argparse.ArgumentTypeError(UNSENDABLE_KEY)
    return value


def run(args: argparse.Namespace) -> int:
    if _stdin_twice(args.images):
        print("tandem predict: - (standard input) may be given once", file=sys.stderr)
        return 2
    show_progress = args.progress
    if show_progress is None:
        show_progress = len(args.images) > 1 and sys.stderr.isatty()
    bar = Progress(len(args.images), sys.stderr if show_progress else None)
    with Client(args.url, api_key=args.api_key) as client:
        outcomes = [_send(client, path, bar, idempotent=args.idempotent) for path in args.images]
        if args.wait is not None:
            for outcome in outcomes:
                _wait(client, outcome, args.wait)
    bar.done()
    for outcome in outcomes:
        print(json.dumps(outcome.to_json()) if args.json else outcome.to_text(), flush=True)
    return max(outcome.exit_code for outcome in outcomes)


def _send(client: Client, path: Path, bar: Progress, *, idempotent: bool) -> Outcome:
    outcome = Outcome(str(path))
    try:
        outcome.fast = _predict(client, path, idempotent=idempotent)
    except OSError as exc:
        outcome.error = UnreadableFile(f"cannot read the file: {exc.strerror or exc}")
        outcome.exit_code = EXIT_REFUSED
    except TandemError as exc:
        outcome.error = exc
        # A 429 says nothing of the image: the server was busy, as with a 503.
        refused = exc.status < 500 and not isinstance(exc, TooManyRequests)
        outcome.exit_code = EXIT_REFUSED if refused else EXIT_SERVER
    else:
        if outcome.fast.not_queued is not None:
            outcome.notes.append(f"not queued: {outcome.fast.not_queued.message}")
        if outcome.fast.skipped is not None:
            outcome.notes.append(f"no job: {outcome.fast.skipped}")
    bar.step()
    return outcome


def _stdin_twice(paths: Sequence[Path]) -> bool:
    return sum(str(path) == STDIN for path in paths) > 1


def _image(path: Path) -> bytes | Path:
    """The file at `path`, for the client to read; standard input's bytes for `-`."""
    return sys.stdin.buffer.read() if str(path) == STDIN else path


def _predict(client: Client, path: Path, *, idempotent: bool) -> FastResult:
    image = _image(path)
    if not idempotent:
        return client.predict(image)
    data = image if isinstance(image, bytes) else image.read_bytes()
    # The same file, sent again, names the same job; another file, another job.
    key = "sha256-" + hashlib.sha256(data).hexdigest()
    return client.predict(data, idempotency_key=key)


def _wait(client: Client, outcome: Outcome, wait_s: float) -> None:
    if outcome.fast is None or outcome.fast.job_id is None:
        if outcome.fast is not None and outcome.fast.not_queued is not None:
            outcome.exit_code = max(outcome.exit_code, EXIT_UNFINISHED)
        return
    try:
        outcome.job = client.result(outcome.fast.job_id, wait=wait_s)
    except TandemError as exc:
        outcome.error = exc
        outcome.exit_code = EXIT_SERVER
        return
    if outcome.job.status is not JobStatus.DONE:
        outcome.exit_code = EXIT_UNFINISHED
        if outcome.job.error:
            outcome.notes.append(f"job {outcome.job.status}: {outcome.job.error}")


class Progress:
    """A one-line bar on a terminal; silent without a stream."""

    WIDTH = 30

    def __init__(self, total: int, stream: TextIO | None) -> None:
        self.total, self.count, self.stream = total, 0, stream

    def step(self) -> None:
        self.count += 1
        if self.stream is not None:
            filled = self.WIDTH * self.count // self.total
            bar = "#" * filled + "." * (self.WIDTH - filled)
            self.stream.write(f"\r[{bar}] {self.count}/{self.total}")
            self.stream.flush()

    def done(self) -> None:
        if self.stream is not None:
            self.stream.write("\n")
