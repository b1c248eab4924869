"""Job ids, statuses and records: the vocabulary every store backend speaks."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from tandem.errors import JobNotFound, UnreadableJob
from tandem.predictions import Prediction

PAYLOAD_VERSION = 1
# 128 random bits: unguessable, and collision-free for any realistic number of jobs.
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED})


def new_job_id() -> str:
    return secrets.token_hex(16)


def parse_job_id(value: str) -> str:
    """Return a well-formed id; a malformed one cannot name a job, so it is 'not found', with
    the form an id takes, for whoever copied one wrong."""
    if not _JOB_ID.fullmatch(value):
        raise JobNotFound(
            "no such job: a job id is 32 lowercase hexadecimal digits", job_id=value[:64]
        )
    return value


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What the proxy hands to a store: the exact client bytes plus what it already knows."""

    id: str
    image: bytes
    fast: Prediction | None = None
    request_id: str | None = None
    # A client's retry with the same key within the result TTL gets this job, not a new one.
    idempotency_key: str | None = None
    # Who sent it: the id of its API key. Idempotency keys count within it, so two clients'
    # keys never meet.
    owner: str | None = None
    # With a key: what a retry must send again (see request_fingerprint).
    fingerprint: str | None = None
    # Where the worker POSTs the result once stored (already checked against the allowlist).
    callback_url: str | None = None
    # The request's trace context (W3C headers), when it was traced: the worker's run of the
    # accurate model joins that trace (see tandem.tracing).
    trace: dict[str, str] | None = None

    @property
    def idempotency_slot(self) -> str | None:
        """The key as stores file it: within its owner's, when it has one. A key is printable
        ASCII without spaces, so an owned slot never equals an unowned one."""
        if self.idempotency_key is None or self.owner is None:
            return self.idempotency_key
        return f"{self.owner} {self.idempotency_key}"

    def queued(self, now: float) -> Job:
        """The job this spec becomes when it is first stored at `now`."""
        return Job(
            self.id,
            JobStatus.QUEUED,
            created_at=now,
            updated_at=now,
            fast=self.fast,
            request_id=self.request_id,
            callback_url=self.callback_url,
            fingerprint=self.fingerprint,
            owner=self.owner,
            trace=self.trace,
        )


def request_fingerprint(image: bytes, callback_url: str | None) -> str:
    """A digest of what makes a request's job: the image and where its result goes."""
    digest = hashlib.sha256(image)
    digest.update(b"\0" + (callback_url or "").encode())
    return digest.hexdigest()


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self is not DeliveryState.PENDING


@dataclass(frozen=True, slots=True)
class Delivery:
    """Where a job's webhook stands."""

    state: DeliveryState
    attempts: int = 0
    last_error: str | None = None
    updated_at: float | None = None


@dataclass(frozen=True, slots=True)
class Job:
    """A job as a client or worker sees it; the image bytes are not part of it."""

    id: str
    status: JobStatus
    created_at: float
    updated_at: float
    attempts: int = 0
    fast: Prediction | None = None
    result: Prediction | None = None
    error: str | None = None
    finished_at: float | None = None
    request_id: str | None = None
    cancel_requested: bool = False
    callback_url: str | None = None
    webhook: Delivery | None = None
    fingerprint: str | None = None
    owner: str | None = None  # the client that sent it (its API key's name or digest)
    trace: dict[str, str] | None = None  # its request's trace context, if it was traced

    @property
    def final(self) -> Prediction | None:
        """The best-known answer: the accurate one once it exists, else the fast one."""
        return self.result if self.result is not None else self.fast

    @property
    def changed(self) -> bool:
        """Whether the accurate model's top-1 differs from the fast model's."""
        return (
            self.result is not None
            and self.fast is not None
            and self.result.label != self.fast.label
        )


@dataclass(frozen=True, slots=True)
class Claim:
    """A job leased to one worker, with the bytes to classify."""

    job: Job
    image: bytes
    worker_id: str = field(default="")

    @property
    def id(self) -> str:
        return self.job.id


def dump_meta(spec: JobSpec) -> str:
    """The JSON stored beside a job's bytes. Versioned so old records stay readable."""
    meta = {
        "v": PAYLOAD_VERSION,
        "request_id": spec.request_id,
        "fast": spec.fast.to_dict() if spec.fast else None,
        "callback_url": spec.callback_url,
        "fingerprint": spec.fingerprint,
    }
    if spec.trace:  # an optional key: readers that predate it ignore it
        meta["trace"] = spec.trace
    return json.dumps(meta, separators=(",", ":"))


def meta_with_fast(job_id: str, text: str, fast: Prediction) -> str | None:
    """Stored metadata with the fast answer added, or None if it holds one already (it stays).
    Metadata this version cannot read raises UnreadableJob: a newer writer's is left as it is."""
    try:
        meta = _versioned(text, "job payload")
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise UnreadableJob(job_id, str(exc)) from exc
    if meta.get("fast"):
        return None
    meta["fast"] = fast.to_dict()
    return json.dumps(meta, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Meta:
    fast: Prediction | None
    request_id: str | None
    callback_url: str | None
    fingerprint: str | None
    trace: dict[str, str] | None


def load_meta(text: str) -> Meta:
    meta = _versioned(text, "job payload")
    fast = Prediction.from_dict(meta["fast"]) if meta.get("fast") else None
    # Records stored before fingerprints (or traces) have none: a retry is not checked
    # against them (nor is a trace joined).
    return Meta(
        fast,
        meta.get("request_id"),
        meta.get("callback_url"),
        meta.get("fingerprint"),
        _trace(meta.get("trace")),
    )


def _trace(value: Any) -> dict[str, str] | None:
    """A stored trace context; anything but a map of strings is dropped, not trusted."""
    if not isinstance(value, dict):
        return None
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)} or None


def dump_delivery(delivery: Delivery) -> str:
    body = {"v": PAYLOAD_VERSION, **asdict(delivery)}
    return json.dumps(body, separators=(",", ":"))


def load_delivery(text: str | None) -> Delivery | None:
    if not text:
        return None
    data = _versioned(text, "webhook state")
    return Delivery(
        state=DeliveryState(data["state"]),
        attempts=int(data["attempts"]),
        last_error=data.get("last_error"),
        updated_at=data.get("updated_at"),
    )


def _versioned(text: str, what: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(text)
    if data.get("v") != PAYLOAD_VERSION:
        raise ValueError(f"unsupported {what} version {data.get('v')!r}")
    return data


def dump_prediction(answer: Prediction) -> str:
    return json.dumps({"v": PAYLOAD_VERSION, **answer.to_dict()}, separators=(",", ":"))


def load_prediction(text: str | None) -> Prediction | None:
    if not text:
        return None
    return Prediction.from_dict(_versioned(text, "result payload"))


# The stored fields of a job, by the names both backends use (a SQLite row, a Redis hash).
STORED_FIELDS = (
    "status",
    "created_at",
    "updated_at",
    "attempts",
    "meta",
    "result",
    "error",
    "finished_at",
    "cancel",
    "webhook",
    "owner",
)


def job_from_stored(job_id: str, fields: Mapping[str, Any]) -> Job:
    """A Job from its stored fields; values may be text (Redis) or typed (SQLite). A record
    this version cannot read (a newer payload version, or damaged) raises UnreadableJob."""
    try:
        return _job_from_stored(job_id, fields)
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        reason = str(exc) if not isinstance(exc, KeyError) else f"no field {exc}"
        raise UnreadableJob(job_id, reason) from exc


def _job_from_stored(job_id: str, fields: Mapping[str, Any]) -> Job:
    meta = load_meta(str(fields["meta"]))
    finished = fields.get("finished_at")
    return Job(
        id=job_id,
        status=JobStatus(str(fields["status"])),
        created_at=float(fields["created_at"]),
        updated_at=float(fields["updated_at"]),
        attempts=int(fields["attempts"]),
        fast=meta.fast,
        result=load_prediction(fields.get("result")),
        error=fields.get("error"),
        finished_at=float(finished) if finished is not None else None,
        request_id=meta.request_id,
        cancel_requested=str(fields.get("cancel") or "0") == "1",
        callback_url=meta.callback_url,
        webhook=load_delivery(fields.get("webhook")),
        fingerprint=meta.fingerprint,
        owner=fields.get("owner"),
        trace=meta.trace,
    )
