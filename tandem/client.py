"""A Python client for a Tandem server, sync (`Client`) and async (`AsyncClient`).

    with Client("http://127.0.0.1:8000") as tandem:
        fast = tandem.predict(Path("cat.jpg"))
        print(fast.label, "now;", tandem.result(fast.job_id, wait=30).final_label, "later")

Errors the server reports are raised as the typed errors of `tandem.errors` (JobNotFound,
InvalidImage, Overloaded, ...), carrying the server's message and request id; no answer at all
raises ServerUnreachable. A fast answer whose job could not be queued is not an error: it comes
back with `queued` false and the reason in `not_queued`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mimetypes
import ssl
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tandem import tracing
from tandem.errors import ServerUnreachable, TandemError, error_from_wire
from tandem.jobs.records import JobStatus
from tandem.keys import sendable
from tandem.predictions import Prediction

DEFAULT_URL = "http://127.0.0.1:8000"
UNSENDABLE_KEY = "an API key is printable ASCII: no HTTP header carries it otherwise"
# The server caps one long-poll below its request deadline; longer waits take several.
_POLL_S = 20.0
# An event stream that ends before its job is finished (its proxy shutting down, a dropped
# connection) is opened again after these pauses, in turn; more failures in a row raise.
_RECONNECT_S = (0.5, 1.0, 2.0, 4.0, 8.0)
# A long-poll that got no answer (its proxy restarting) is sent again after this, while the
# wait lasts.
_RETRY_S = 0.5
# Refusals of a server too busy to take the request, which leave no job behind, so that
# sending it again is safe: `predict` does, after the Retry-After they carry (at most this).
_BUSY = frozenset({(429, "too_many_requests"), (503, "overloaded")})
_BUSY_PAUSE_MAX_S = 30.0

Image = bytes | str | Path


@dataclass(frozen=True, slots=True)
class FastResult:
    fast: Prediction
    job_id: str | None
    request_id: str | None
    skipped: str | None = None  # the cascade judged the fast answer enough
    not_queued: TandemError | None = None  # the queue refused; retry later

    @property
    def label(self) -> str:
        return self.fast.label

    @property
    def queued(self) -> bool:
        return self.job_id is not None


@dataclass(frozen=True, slots=True)
class JobResult:
    job_id: str
    status: JobStatus
    fast: Prediction | None
    accurate: Prediction | None
    error: str | None

    @property
    def finished(self) -> bool:
        return self.status.terminal

    @property
    def final(self) -> Prediction | None:
        return self.accurate or self.fast

    @property
    def final_label(self) -> str | None:
        return self.final.label if self.final else None

    @property
    def changed(self) -> bool:
        return bool(self.accurate and self.fast and self.accurate.label != self.fast.label)

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> JobResult:
        return cls(
            job_id=body["job_id"],
            status=JobStatus(body["status"]),
            fast=_prediction(body.get("fast")),
            accurate=_prediction(body.get("accurate")),
            error=body.get("error"),
        )


def _prediction(data: dict[str, Any] | None) -> Prediction | None:
    return Prediction.from_dict(data) if data else None


def _image_request(image: Image) -> tuple[bytes, dict[str, str]]:
    """Raw bytes with their media type: the cheapest body the server takes."""
    if isinstance(image, bytes):
        return image, {"Content-Type": "application/octet-stream"}
    path = Path(image)
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if not kind.startswith("image/"):
        kind = "application/octet-stream"  # the server looks at the bytes themselves
    return path.read_bytes(), {"Content-Type": kind}


def _checked(response: httpx.Response) -> dict[str, Any]:
    body = _json(response)
    if response.status_code >= 400:
        raise error_from_wire(response.status_code, body)
    return body


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    return body if isinstance(body, dict) else {}


def _retries(n: int) -> int:
    if n < 0:
        raise ValueError(f"busy_retries must be 0 or more, not {n}")
    return n


def _busy_pause(response: httpx.Response, tries_left: int) -> float | None:
    """Seconds to wait before sending again a request the server was too busy to take; None
    if it was not that, or no tries are left."""
    if tries_left <= 0 or response.status_code not in (429, 503):
        return None
    error = _json(response).get("error")
    code = error.get("code") if isinstance(error, dict) else None
    if (response.status_code, code) not in _BUSY:
        return None
    try:
        after = float(response.headers.get("retry-after", "1"))
    except ValueError:  # an HTTP date, which Tandem never sends
        after = 1.0
    return min(max(after, 0.0), _BUSY_PAUSE_MAX_S)


class _NoStream(Exception):
    """The server has no event stream to spare for now: read the job, and try again after
    `pause_s`."""

    def __init__(self, pause_s: float) -> None:
        super().__init__(pause_s)
        self.pause_s = pause_s


def _refused(response: httpx.Response) -> None:
    """Raise what refused an event stream: _NoStream where the server is busy, else the
    typed error."""
    pause = _busy_pause(response, tries_left=1)
    if pause is not None:
        raise _NoStream(pause)
    _checked(response)


def _fast_result(response: httpx.Response) -> FastResult:
    body = _json(response)
    # A 503 or 429 that still carries a fast answer is the queue refusing, not the request
    # failing.
    if response.status_code in (429, 503) and "fast" in body:
        refusal = error_from_wire(response.status_code, {"error": body.get("error")})
        return _fast_from(body, response, not_queued=refusal)
    return _fast_from(_checked(response), response)


def _fast_from(
    body: dict[str, Any], response: httpx.Response, not_queued: TandemError | None = None
) -> FastResult:
    fast = _prediction(body["fast"])
    assert fast is not None
    return FastResult(
        fast=fast,
        job_id=body.get("job_id"),
        request_id=response.headers.get("x-request-id"),
        skipped=(body.get("cascade") or {}).get("reason"),
        not_queued=not_queued,
    )


class EventParser:
    """Server-Sent Events, line by line: `feed` returns a JobResult at each complete event, and
    raises the typed error that an `error` event (the stream's last) carries."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> JobResult | None:
        if line.startswith("event:"):
            self._event = line[6:].strip()
        elif line.startswith("data:"):
            self._data.append(line[5:].strip())
        elif not line and self._data:
            body, self._data = json.loads("\n".join(self._data)), []
            if self._event == "error":
                raise error_from_wire(None, body)
            return JobResult.from_wire(body)
        return None


class _Following:
    """What `events` has seen of a job across its streams: the last state (each stream
    starts with the current one, which is not given twice) and the failures in a row."""

    def __init__(self) -> None:
        self.last: JobResult | None = None
        self._failures = 0

    def fresh(self, state: JobResult) -> bool:
        if state == self.last:
            return False
        self.last, self._failures = state, 0
        return True

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.finished

    def pause(self, error: ServerUnreachable | None) -> float:
        """Seconds to wait before the next stream. Raises once the pauses are spent, or at
        once if no stream ever began: then the server is not there to come back."""
        if self.last is None or self._failures == len(_RECONNECT_S):
            raise error or ServerUnreachable("the job's event stream kept ending unfinished")
        self._failures += 1
        return _RECONNECT_S[self._failures - 1]


class _Polling:
    """What `result` has of a job across its long-polls: the last answer, and the error of the
    last one if it got none."""

    def __init__(self) -> None:
        self._job: JobResult | None = None
        self._error: ServerUnreachable | None = None

    def answered(self, job: JobResult) -> bool:
        """Keep the answer; whether the job is finished."""
        self._job, self._error = job, None
        return job.finished

    def failed(self, error: ServerUnreachable) -> None:
        """Asked again while the wait lasts; raised at once if no poll was ever answered:
        then the server is not there to come back."""
        if self._job is None:
            raise error
        self._error = error

    def outcome(self) -> JobResult:
        if self._error is not None:
            raise self._error
        assert self._job is not None  # the first poll answered, or raised
        return self._job


def _predict_request(
    image: Image, policy: str | None, threshold: float | None, idempotency_key: str | None
) -> dict[str, Any]:
    """POST /predict's body, headers and query, as httpx's keyword arguments."""
    content, headers = _image_request(image)
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    given = {"policy": policy, "threshold": threshold}
    params = {k: str(v) for k, v in given.items() if v is not None}
    return {"content": content, "headers": headers, "params": params}


def _traced(request: httpx.Request) -> None:
    """A call made within a span that records (the caller's OpenTelemetry) carries its trace:
    the server's spans for the request, and later for its job, go on in the caller's trace."""
    if (context := tracing.current_context()) is not None:
        request.headers.update(context)


async def _traced_async(request: httpx.Request) -> None:
    _traced(request)


def _headers(api_key: str | None) -> dict[str, str]:
    if api_key and not sendable(api_key):  # httpx would fail each request, deep in its send
        raise ValueError(UNSENDABLE_KEY)
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _wait_params(wait: float) -> dict[str, str]:
    return {"wait": str(wait)} if wait else {}


def _wait_steps(wait: float | None) -> Iterator[float]:
    """Long-poll durations that add up to `wait` (one step of 0 without a wait)."""
    deadline = time.monotonic() + (wait or 0.0)
    yield min(wait or 0.0, _POLL_S)
    while (left := deadline - time.monotonic()) > 0:
        yield min(left, _POLL_S)


class Client:
    """Blocking client; also a context manager that closes its connections."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        busy_retries: int = 3,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self._http = httpx.Client(
            base_url=url,
            timeout=timeout,
            headers=_headers(api_key),
            verify=verify,
            event_hooks={"request": [_traced]},
        )
        self._busy_retries = _retries(busy_retries)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with _answered(self._http.base_url):
            return self._http.request(method, path, **kwargs)

    def predict(
        self,
        image: Image,
        *,
        policy: str | None = None,
        threshold: float | None = None,
        idempotency_key: str | None = None,
    ) -> FastResult:
        """The fast answer and the job's id. With `idempotency_key`, sending the same image
        again (a retry after ServerUnreachable or Timeout) gets the same job, not a second. A
        server too busy to take it (429, or 503 `overloaded`) is sent it again after the wait it
        asks for, up to `busy_retries` times."""
        request = _predict_request(image, policy, threshold, idempotency_key)
        for tries_left in range(self._busy_retries, -1, -1):
            response = self._send("POST", "/predict", **request)
            pause = _busy_pause(response, tries_left)
            if pause is None:
                break
            time.sleep(pause)
        return _fast_result(response)

    def job(self, job_id: str, wait: float = 0.0) -> JobResult:
        response = self._send("GET", f"/job/{job_id}", params=_wait_params(wait))
        return JobResult.from_wire(_checked(response))

    def result(self, job_id: str, wait: float | None = None) -> JobResult:
        """The job now, or, with `wait`, once finished or when `wait` seconds have passed. A
        server that stops answering meanwhile (a proxy restarting) is asked again while the
        wait lasts; one with no long-poll to spare is asked without one, after a pause."""
        polling = _Polling()
        for step in _wait_steps(wait):
            try:
                if polling.answered(self._long_poll(job_id, step)):
                    break
            except ServerUnreachable as exc:
                polling.failed(exc)
                time.sleep(_RETRY_S)
        return polling.outcome()

    def events(self, job_id: str) -> Iterator[JobResult]:
        """Each state of the job as the server pushes it, until it is finished. A stream that
        ends first (its proxy shut down, the connection dropped) is opened again. While the
        server has no stream to spare (429, or 503 `overloaded`), the job is read instead,
        after each pause it asks for."""
        following = _Following()
        while True:
            error, pause = None, None
            try:
                for state in self._stream(job_id):
                    if following.fresh(state):
                        yield state
            except ServerUnreachable as exc:
                error = exc
            except _NoStream as busy:
                pause = busy.pause_s
                # A server gone meanwhile is met by the next stream, with its reconnects.
                with contextlib.suppress(ServerUnreachable):
                    if following.fresh(state := self.job(job_id)):
                        yield state
            if following.finished:
                return
            time.sleep(following.pause(error) if pause is None else pause)

    def _long_poll(self, job_id: str, step: float) -> JobResult:
        """A long-poll of `step` seconds; where the server has no watch to spare for it (429,
        or 503 `overloaded`), a pause of at most `step`, then the job read without one."""
        response = self._send("GET", f"/job/{job_id}", params=_wait_params(step))
        pause = _busy_pause(response, tries_left=1)
        if pause is None:
            return JobResult.from_wire(_checked(response))
        time.sleep(min(pause, step))
        return self.job(job_id)

    def _stream(self, job_id: str) -> Iterator[JobResult]:
        with (
            _answered(self._http.base_url),
            self._http.stream("GET", f"/job/{job_id}/events", timeout=None) as response,
        ):
            if response.status_code >= 400:
                response.read()
                _refused(response)
            yield from _parse(response.iter_lines())

    def cancel(self, job_id: str) -> JobResult:
        return JobResult.from_wire(_checked(self._send("DELETE", f"/job/{job_id}")))


@contextlib.contextmanager
def _answered(url: httpx.URL) -> Iterator[None]:
    """No HTTP answer at all (refused, reset, timed out) is ServerUnreachable."""
    try:
        yield
    except httpx.TransportError as exc:
        raise ServerUnreachable(f"no answer from {url}: {exc}") from exc


def _parse(lines: Iterable[str]) -> Iterator[JobResult]:
    parser = EventParser()
    for line in lines:
        if (event := parser.feed(line)) is not None:
            yield event


class AsyncClient:
    """The same, for asyncio."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        busy_retries: int = 3,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=url,
            timeout=timeout,
            headers=_headers(api_key),
            verify=verify,
            event_hooks={"request": [_traced_async]},
        )
        self._busy_retries = _retries(busy_retries)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with _answered(self._http.base_url):
            return await self._http.request(method, path, **kwargs)

    async def predict(
        self,
        image: Image,
        *,
        policy: str | None = None,
        threshold: float | None = None,
        idempotency_key: str | None = None,
    ) -> FastResult:
        request = _predict_request(image, policy, threshold, idempotency_key)
        for tries_left in range(self._busy_retries, -1, -1):
            response = await self._send("POST", "/predict", **request)
            pause = _busy_pause(response, tries_left)
            if pause is None:
                break
            await asyncio.sleep(pause)
        return _fast_result(response)

    async def job(self, job_id: str, wait: float = 0.0) -> JobResult:
        response = await self._send("GET", f"/job/{job_id}", params=_wait_params(wait))
        return JobResult.from_wire(_checked(response))

    async def result(self, job_id: str, wait: float | None = None) -> JobResult:
        polling = _Polling()
        for step in _wait_steps(wait):
            try:
                if polling.answered(await self._long_poll(job_id, step)):
                    break
            except ServerUnreachable as exc:
                polling.failed(exc)
                await asyncio.sleep(_RETRY_S)
        return polling.outcome()

    async def events(self, job_id: str) -> AsyncIterator[JobResult]:
        following = _Following()
        while True:
            error, pause = None, None
            try:
                async for state in self._stream(job_id):
                    if following.fresh(state):
                        yield state
            except ServerUnreachable as exc:
                error = exc
            except _NoStream as busy:
                pause = busy.pause_s
                with contextlib.suppress(ServerUnreachable):
                    if following.fresh(state := await self.job(job_id)):
                        yield state
            if following.finished:
                return
            await asyncio.sleep(following.pause(error) if pause is None else pause)

    async def _long_poll(self, job_id: str, step: float) -> JobResult:
        response = await self._send("GET", f"/job/{job_id}", params=_wait_params(step))
        pause = _busy_pause(response, tries_left=1)
        if pause is None:
            return JobResult.from_wire(_checked(response))
        await asyncio.sleep(min(pause, step))
        return await self.job(job_id)

    async def _stream(self, job_id: str) -> AsyncIterator[JobResult]:
        parser = EventParser()
        with _answered(self._http.base_url):
            async with self._http.stream("GET", f"/job/{job_id}/events", timeout=None) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _refused(response)
                async for line in response.aiter_lines():
                    if (event := parser.feed(line)) is not None:
                        yield event

    async def cancel(self, job_id: str) -> JobResult:
        return JobResult.from_wire(_checked(await self._send("DELETE", f"/job/{job_id}")))
