"""Webhooks: the worker POSTs a job's result to the URL its request named, once stored.

Only hosts on the configured allowlist are ever called (checked by the proxy when the request
arrives and again by the worker before each call); redirects are not followed. Each body is
signed: `Tandem-Signature: sha256=HMAC-SHA256(secret, "<Tandem-Timestamp>.<body>")`, which a
receiver checks with `verify`. Failures are retried with exponential backoff; the state of the
delivery is stored on the job. Workers also take up, every so often, the deliveries no worker
is making (`JobStore.undelivered`): so a job is posted at least once, even if it ended where no
worker saw it or its worker stopped mid-retry; a receiver tells repeats apart by `job_id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from tandem import tracing
from tandem.errors import CallbackNotAllowed, QueueUnavailable
from tandem.jobs.records import Delivery, DeliveryState, Job
from tandem.jobs.store import JobStore
from tandem.logs import counted
from tandem.tasks import stop

log = logging.getLogger("tandem.webhooks")

SIGNATURE_HEADER = "Tandem-Signature"
TIMESTAMP_HEADER = "Tandem-Timestamp"
# The store's counters of delivery outcomes, shared by every worker (tandem_webhooks_total).
COUNTERS = {
    DeliveryState.DELIVERED: "webhooks_delivered",
    DeliveryState.FAILED: "webhooks_failed",
    DeliveryState.PENDING: "webhooks_retried",
}
# How long a stopping worker gives deliveries in progress.
STOP_GRACE_S = 5.0
# Of a receiver's answer only the status counts. A short body is read, so that its connection
# serves the next post; a longer one is left, and the connection closed with it.
READ_AT_MOST = 64 * 1024


@dataclass(frozen=True, slots=True)
class WebhookPolicy:
    allowed_hosts: frozenset[str] = frozenset()  # "host" or "host:port"
    secret: str = ""
    max_attempts: int = 5
    timeout_s: float = 5.0
    backoff_s: float = 1.0
    # Posts in flight at once; more wait for a turn, which is not an attempt.
    concurrency: int = 100

    @property
    def enabled(self) -> bool:
        return bool(self.allowed_hosts)

    @property
    def stalled_after_s(self) -> float:
        """A pending delivery untouched for this long has lost its worker: twice the longest
        wait between two of its records (the last backoff and a timed-out attempt)."""
        return 2 * (self.timeout_s + self.backoff_s * 2.0 ** (self.max_attempts - 1))

    def check(self, url: str) -> str:
        """The URL, if it may be called; else CallbackNotAllowed, saying why."""
        if not self.allowed_hosts:
            raise CallbackNotAllowed("webhooks are off on this server (no allowed hosts)")
        try:
            parts = urlsplit(url)
            port = parts.port  # raises on a port out of range
            httpx.URL(url)  # what the sender will be given must be a URL it takes
        except (ValueError, httpx.InvalidURL) as exc:
            raise CallbackNotAllowed(
                f"callback_url is not a valid URL: {exc}", url=url[:200]
            ) from exc
        if port == 0:
            raise CallbackNotAllowed("callback_url is not a valid URL: port 0", url=url[:200])
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CallbackNotAllowed("callback_url must be an http or https URL", url=url[:200])
        if parts.username is not None or parts.password is not None:
            # They would be stored with the job, shown by GET /job/{id} and sent as Basic auth.
            raise CallbackNotAllowed(
                "callback_url must not carry credentials: receivers check the "
                f"{SIGNATURE_HEADER} header instead"
            )
        host = parts.hostname.lower()
        if host not in self.allowed_hosts and parts.netloc.lower() not in self.allowed_hosts:
            raise CallbackNotAllowed(f"{parts.netloc} is not on the webhook allowlist")
        return url


def sign(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def verify(
    secret: str, body: bytes, timestamp: str, signature: str, tolerance_s: float = 300.0
) -> bool:
    """For receivers: the signature matches and the timestamp is recent (no replays)."""
    try:
        age = abs(time.time() - float(timestamp))
    except ValueError:
        return False
    return age <= tolerance_s and hmac.compare_digest(sign(secret, timestamp, body), signature)


def payload(job: Job) -> bytes:
    """What the receiver gets: the job as GET /job/{id} reports its answers."""
    body = {
        "type": "job.finished",
        "job_id": job.id,
        "status": str(job.status),
        "fast": job.fast.to_dict() if job.fast else None,
        "accurate": job.result.to_dict() if job.result else None,
        "final_label": job.final.label if job.final else None,
        "changed": job.changed,
        "request_id": job.request_id,
        "finished_at": job.finished_at,
    }
    return json.dumps(body, separators=(",", ":")).encode()


class DeliveryFailed(Exception):
    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.permanent = permanent  # a retry would not change it


class WebhookSender:
    """Delivers in background tasks, so inference never waits on a receiver."""

    def __init__(self, store: JobStore, policy: WebhookPolicy) -> None:
        self.store = store
        self.policy = policy
        limits = httpx.Limits(max_connections=policy.concurrency)
        self._http = httpx.AsyncClient(
            timeout=policy.timeout_s, follow_redirects=False, limits=limits
        )
        # Waiting for one of the client's connections counted against the attempt's timeout:
        # more finished jobs than connections to a slow receiver failed attempts (PoolTimeout)
        # that never reached it. A post waits for its turn here instead, outside the timeout.
        self._turns = asyncio.Semaphore(policy.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, job: Job) -> None:
        task = asyncio.create_task(self._deliver(job), name=f"tandem-webhook-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Give deliveries in progress a moment, then stop them."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=STOP_GRACE_S)
        for task in list(self._tasks):
            await stop(task)
        await self._http.aclose()

    async def _deliver(self, job: Job) -> None:
        try:
            await self._attempts(job)
        except Exception as exc:  # a bug must not leave the delivery pending, to be taken up again
            log.exception("the webhook for job %s failed", job.id, extra={"job_id": job.id})
            attempts = job.webhook.attempts if job.webhook is not None else 0
            await self._record(job, DeliveryState.FAILED, attempts, f"{type(exc).__name__}: {exc}")

    async def _attempts(self, job: Job) -> None:
        assert job.callback_url is not None
        body = payload(job)
        state = DeliveryState.FAILED
        # A delivery taken up from a stopped worker goes on from its last attempt.
        error = job.webhook.last_error if job.webhook is not None else None
        attempt = made = job.webhook.attempts if job.webhook is not None else 0
        for attempt in range(made + 1, self.policy.max_attempts + 1):
            try:
                await self._post(job, job.callback_url, body)
            except DeliveryFailed as exc:
                error = str(exc)
                if exc.permanent:
                    break
                if attempt < self.policy.max_attempts:
                    await self._record(job, DeliveryState.PENDING, attempt, error)
                    await asyncio.sleep(self.policy.backoff_s * 2 ** (attempt - 1))
            else:
                state, error = DeliveryState.DELIVERED, None
                break
        await self._record(job, state, attempt, error)
        log.info(
            "webhook for job %s %s after %s",
            job.id,
            state,
            counted(attempt, "attempt"),
            extra={"job_id": job.id, "request_id": job.request_id},
        )

    async def _post(self, job: Job, url: str, body: bytes) -> None:
        try:
            self.policy.check(url)  # again: the store is not trusted to hold only allowed URLs
        except CallbackNotAllowed as exc:
            raise DeliveryFailed(exc.message, permanent=True) from exc
        async with self._turns:
            status = await self._send(job, url, body)
        if 200 <= status < 300:
            return
        # Redirects are never followed, and a client error will not mend itself by waiting.
        retryable = status >= 500 or status in (408, 429)
        raise DeliveryFailed(f"HTTP {status} from the receiver", permanent=not retryable)

    async def _send(self, job: Job, url: str, body: bytes) -> int:
        """The receiver's status; signed as it goes out, so a post that waited for its turn
        does not look stale to the receiver. A traced job's post is a span in its trace."""
        timestamp = f"{time.time():.0f}"
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self.policy.secret, timestamp, body),
        }
        with tracing.posting(job, url, headers) as span:
            status = await self._exchange(url, body, headers)
            tracing.answered(span, status)
        return status

    async def _exchange(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        status: int | None = None
        try:
            # httpx's timeout bounds each read; a receiver sending its answer a byte at a time
            # had held the post for good.
            async with asyncio.timeout(self.policy.timeout_s):
                async with self._http.stream("POST", url, content=body, headers=headers) as answer:
                    status = answer.status_code
                    await _read_some(answer, READ_AT_MOST)
        except (httpx.HTTPError, TimeoutError) as exc:
            if status is None:  # once the status is in, the body does not matter
                reason = str(exc) or f"no answer within {self.policy.timeout_s:g} s"
                raise DeliveryFailed(f"{type(exc).__name__}: {reason}", permanent=False) from exc
        return status

    async def _record(
        self, job: Job, state: DeliveryState, attempts: int, error: str | None
    ) -> None:
        """Count the delivery's state (pending again: an attempt failed and another follows),
        then store it on its job: whoever sees the state sees it counted. Each is tried
        whatever became of the other: a state not stored has the delivery made again."""
        delivery = Delivery(state, attempts, error, time.time())
        # The delivery matters more than its record, and the record more than its count.
        with contextlib.suppress(QueueUnavailable):
            await self.store.add_counts({COUNTERS[state]: 1})
        with contextlib.suppress(QueueUnavailable):
            await self.store.record_delivery(job.id, delivery)


async def _read_some(answer: httpx.Response, limit: int) -> None:
    """Read the answer's body up to `limit` bytes: one that streamed without end had been read
    whole, into memory."""
    read = 0
    async for chunk in answer.aiter_raw():
        read += len(chunk)
        if read > limit:
            return
