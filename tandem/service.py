"""What the proxy does, independent of HTTP: answer fast, queue for the accurate model, report."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from PIL import Image

from tandem import tracing
from tandem.cascade import Agreement, Gate, Policy, SeenTally, late_judgement
from tandem.errors import (
    DiskLow,
    IdempotencyKeyReused,
    JobFinished,
    JobNotFound,
    Overloaded,
    QueueFull,
    QueueUnavailable,
    ServiceUnavailable,
    TandemError,
    Timeout,
    TooManyQueued,
    TooManyRequests,
    UnreadableJob,
)
from tandem.jobs.notify import Watch
from tandem.jobs.records import (
    Job,
    JobSpec,
    JobStatus,
    new_job_id,
    parse_job_id,
    request_fingerprint,
)
from tandem.jobs.store import JobStore, QueueStats
from tandem.outage import Outage
from tandem.predictions import Prediction
from tandem.runtime.abort import RunAbort
from tandem.runtime.assets import sample_image_bytes
from tandem.runtime.classifier import Classifier, tried_on_the_sample_photo
from tandem.runtime.imaging import ImageLimits, decode_image
from tandem.runtime.priority import Occupancy
from tandem.shares import Holdings

log = logging.getLogger("tandem.service")

A = TypeVar("A")
R = TypeVar("R")

OK = "ok"
# A worker that has not beaten for this long no longer counts as serving its model.
WORKER_ALIVE_S = 20.0
OUTAGE_RETRY_S = 0.5
# A fast answer waits at most this long to be written when no other request comes along.
ANSWER_WRITE_AFTER_S = 0.02


@dataclass(frozen=True, slots=True)
class Timings:
    decode_ms: float
    fast_ms: float
    enqueue_ms: float
    total_ms: float


# Why the store took no job: full (for all, or for this client's key), or out of reach.
Refusal = ServiceUnavailable | TooManyQueued


@dataclass(frozen=True, slots=True)
class FastOutcome:
    """The fast answer, and either the stored job, or why there is none: refused by the store
    (`not_queued`), or not needed under the cascade's gate (`skipped`)."""

    prediction: Prediction
    job: Job | None
    timings: Timings
    gate: Gate
    not_queued: Refusal | None = None
    skipped: str | None = None

    @property
    def fate(self) -> str:
        """What became of the job: `queued`, `skipped` (the cascade judged the fast answer
        enough), or the code of the store's refusal: a fixed few values."""
        if self.not_queued is not None:
            return self.not_queued.code
        return "skipped" if self.skipped is not None else "queued"


@dataclass(frozen=True, slots=True)
class Stats:
    gate: Gate
    agreement: Agreement
    counts: dict[str, int]


class TandemService:
    """The proxy's use cases. Blocking work (decode, ONNX) runs on a bounded thread pool."""

    def __init__(
        self,
        store: JobStore,
        fast: Classifier,
        accurate_model: str,
        *,
        top_k: int,
        limits: ImageLimits,
        concurrency: int,
        retry_after_s: int = 5,
        fast_timeout_s: float = 10.0,
        gate: Gate | None = None,
        max_watches: int = 1000,
        max_watches_per_key: int = 0,
        private_jobs: bool = False,
    ) -> None:
        self.store = store
        # Each job is its client's alone: another's reads it as one that never existed.
        self.private_jobs = private_jobs
        self.max_watches = max_watches
        self._watching_clients = Holdings(max_watches_per_key)  # 0: no client has a share
        self.fast = fast
        self.accurate_model = accurate_model
        self.top_k = top_k
        self.limits = limits
        self.retry_after_s = retry_after_s
        self.fast_timeout_s = fast_timeout_s
        self.gate = gate or Gate()
        self.seen = SeenTally()
        self._executor = ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="tandem-fast"
        )
        # Fast-model calls in flight: who may use every core, and when the worker must wait.
        self.calls = Occupancy()
        self.sample_prediction: Prediction | None = None
        # Why the embedded worker stopped, if it died: liveness fails, so that it is restarted.
        self.worker_failure: ServiceUnavailable | None = None
        # Set when the server begins to shut down: streams and long-polls end (see drain).
        self.draining = False
        self._watches: set[Watch] = set()
        # Fast answers added to their jobs after the response went out (see _attach_later).
        self._answers = _AnswerWrites(self._attach_fast, ANSWER_WRITE_AFTER_S)
        self._storing = Outage(log, "storing new jobs")

    async def warm_up(self) -> None:
        """Run the sample photo once: the first ONNX call is slow, and /metadata shows it. A
        model that cannot classify it is refused at start-up."""
        loop = asyncio.get_running_loop()
        with tried_on_the_sample_photo(self.fast.name):
            prediction, _ = await loop.run_in_executor(
                self._executor, self._classify, sample_image_bytes(), RunAbort()
            )
        self.sample_prediction = prediction

    async def close(self) -> None:
        """Finish adding fast answers to their jobs, then stop the pool."""
        await self._answers.drain()
        self._executor.shutdown(wait=True)

    def _classify(
        self,
        data: bytes,
        runs: RunAbort,
        on_decoded: Callable[[], object] | None = None,
    ) -> tuple[Prediction, float]:
        """Decode and predict, on a pool thread. A call with the pool to itself, decoding
        included, runs the model on every core (see Classifier); others share them. `runs`
        stops the model's run once the request has given up."""
        with self.calls.held() as alone:
            image, decode_ms = self._decode(data)
            if on_decoded is not None:
                on_decoded()
            with runs.watching() as options:
                predictions = self.fast.predict(
                    [image], self.top_k, solo=alone(), run_options=options
                )
            return predictions[0], decode_ms

    def _decode(self, data: bytes) -> tuple[Image.Image, float]:
        started = time.perf_counter()
        image = decode_image(data, self.limits, self.fast.decode_side)
        return image, (time.perf_counter() - started) * 1000.0

    async def predict(
        self,
        data: bytes,
        request_id: str | None = None,
        idempotency_key: str | None = None,
        gate: Gate | None = None,
        callback_url: str | None = None,
        *,
        owner: str | None = None,
    ) -> FastOutcome:
        """Answer with the fast model and store the job durably, unless the gate says the fast
        answer is enough. Bad images raise before anything is stored; a full or unreachable
        queue still gets the fast answer, with the reason instead. An idempotency key counts
        within its owner's (the client's API key id), when it has one."""
        gate = gate or self.gate
        spec = JobSpec(
            id=new_job_id(),
            image=data,
            request_id=request_id,
            idempotency_key=idempotency_key,
            owner=owner,
            callback_url=callback_url,
            trace=tracing.current_context(),
        )
        # Overlapping the job's write with the model saves a lone request its write's time,
        # but costs a second write (the fast answer, added after). With other calls running
        # the cores are full and CPU is what counts: one write, after the model, gave 3 to 4 %
        # more requests/s at 4 and 16 clients.
        if gate.policy is Policy.ALWAYS and not self.calls.busy():
            outcome = await self._predict_and_enqueue_at_once(spec, gate)
        else:
            outcome = await self._predict_then_enqueue(spec, gate)
        self.seen.add(outcome.prediction)
        return outcome

    async def _predict_then_enqueue(self, spec: JobSpec, gate: Gate) -> FastOutcome:
        """The fast answer first, then the job stored with it in one write (if the gate wants
        a job)."""
        clock = _Clock()
        prediction, decode_ms = await self._in_time(self._classify, spec.image)
        skipped = gate.skip_reason(prediction)
        if skipped is not None:
            timings = clock.timings(decode_ms, prediction, enqueue_ms=0.0)
            return FastOutcome(prediction, None, timings, gate, skipped=skipped)
        enqueue = self._enqueue_timed(replace(spec, fast=prediction), time.perf_counter())
        (job, not_queued), enqueue_ms = await self._given_out(asyncio.ensure_future(enqueue), spec)
        if job is not None:  # an idempotent retry may find its job without a fast answer
            job = self._attach_later(job, prediction)
        timings = clock.timings(decode_ms, prediction, enqueue_ms)
        return FastOutcome(prediction, job, timings, gate, not_queued)

    async def _predict_and_enqueue_at_once(self, spec: JobSpec, gate: Gate) -> FastOutcome:
        """Every request gets a job: store it (an fsync, or a round trip) while the fast model
        runs, then add the fast answer to it. The job is stored only once the image decoded,
        so one that cannot be classified never becomes a job."""
        clock = _Clock()
        loop = asyncio.get_running_loop()
        pending = _PendingEnqueue(self._enqueue_timed, spec)

        def decoded() -> None:
            # From here the request needs one core until its model runs: a good moment for
            # the store's writes (this job, and earlier requests' fast answers).
            pending.start()
            self._answers.start()

        # Called from the pool's thread as soon as the image decoded: no hop back first.
        classify = functools.partial(
            self._classify, on_decoded=functools.partial(loop.call_soon_threadsafe, decoded)
        )
        try:
            prediction, decode_ms = await self._in_time(classify, spec.image)
        except BaseException:
            await self._withdraw(pending.abandon(), spec)
            raise
        (job, not_queued), enqueue_ms = await self._given_out(pending.started(), spec)
        if job is not None:
            job = self._attach_later(job, prediction)
        timings = clock.timings(decode_ms, prediction, enqueue_ms)
        return FastOutcome(prediction, job, timings, gate, not_queued)

    async def _enqueue_timed(self, spec: JobSpec, started: float) -> EnqueueResult:
        outcome = await self._enqueue(spec)
        return outcome, _ms_since(started)

    def _attach_later(self, job: Job, prediction: Prediction) -> Job:
        """Add the fast answer to the stored job without making the client wait for it.

        The job is already safe: that is the enqueue's durable write. The fast answer is
        extra (it is written without waiting for the disk), and the client holds it already.
        It is written once the next request has decoded its image, or after
        ANSWER_WRITE_AFTER_S: written at once, it met the next request on its way in, and cost
        a client sending one image after another about 2 % of its latency.
        Reads through this service wait for it, so a client never sees its own job without it;
        another proxy may, for the moment before the write.
        """
        if job.fast is not None:  # an idempotent retry: the first request's answer stays
            return job
        self._answers.add(job.id, prediction)
        return replace(job, fast=prediction)

    async def _attach_fast(self, job_id: str, prediction: Prediction) -> None:
        try:
            accurate = await self.store.attach_fast(job_id, prediction)
            if accurate is not None:  # a worker answered first, and left the judging to us
                await self.store.add_counts(late_judgement(prediction, accurate))
        except QueueUnavailable:  # the job is stored; the answer was extra
            log.warning("the fast answer was not added to job %s: the queue is unavailable", job_id)
        except UnreadableJob as exc:  # rewritten meanwhile by a newer version, which owns it now
            log.warning("the fast answer was not added to job %s: %s", job_id, exc)
        except Exception:  # nobody awaits this task to hear of it
            log.exception("adding the fast answer to job %s failed", job_id)

    async def _written(self, job_id: str) -> None:
        """Wait for this service's own pending write to the job, if any: every call that
        answers with a job waits, so a client never sees its own job without it."""
        await self._answers.written(job_id)

    async def _given_out(
        self, enqueue: asyncio.Task[EnqueueResult], spec: JobSpec
    ) -> EnqueueResult:
        """The enqueue's outcome. A request cancelled meanwhile (its deadline) lets the enqueue
        finish, and withdraws the job it stored."""
        try:
            return await asyncio.shield(enqueue)
        except asyncio.CancelledError:
            await self._withdraw(enqueue, spec)
            raise

    async def _withdraw(self, enqueue: asyncio.Task[EnqueueResult] | None, spec: JobSpec) -> None:
        """The request failed once its job's enqueue had begun (a deadline): the client never
        learns the job's id, so the job is cancelled rather than run for nobody. Not one with
        an idempotency key: the client's retry reaches it, and must find it queued."""
        if enqueue is None:
            return
        try:
            (job, _), _ = await enqueue
        except TandemError:  # it stored nothing of this request's (a reused key)
            return
        except Exception:
            log.exception("storing the job of a request that failed went wrong too")
            return
        if job is not None and spec.idempotency_key is None:
            with contextlib.suppress(QueueUnavailable):
                await self.store.cancel(job.id)

    async def _in_time(self, fn: Callable[[A, RunAbort], R], arg: A) -> R:
        """Run a step of the fast path on the bounded pool, within the fast deadline. A step
        whose request gave up (this deadline, the request's, or a client gone) has its model
        run stopped, so that it does not hold one of the pool's few threads."""
        loop = asyncio.get_running_loop()
        runs = RunAbort()
        # In the request's context, so that what the step logs carries its request id.
        call = loop.run_in_executor(self._executor, contextvars.copy_context().run, fn, arg, runs)
        try:
            return await asyncio.wait_for(call, self.fast_timeout_s)
        except TimeoutError as exc:
            raise Timeout(f"the fast model did not answer within {self.fast_timeout_s} s") from exc
        finally:
            runs.abort()  # nothing to stop once the step has returned

    async def _enqueue(self, spec: JobSpec) -> tuple[Job | None, Refusal | None]:
        if spec.idempotency_key is not None:
            # Taken here, where the job is stored and checked: a request the cascade skips, or
            # whose image does not decode, never pays for the digest on the event loop.
            spec = replace(spec, fingerprint=request_fingerprint(spec.image, spec.callback_url))
        try:
            job = await self.store.enqueue(spec)
        except (ServiceUnavailable, TooManyQueued) as exc:
            if isinstance(exc, QueueUnavailable | DiskLow):  # a full queue is load, not a fault
                self._storing.failed(str(exc))
            exc.details.setdefault("retry_after", self.retry_after_s)
            return None, exc
        except TandemError:  # says what went wrong already
            raise
        except Exception:
            # A fault the store did not foresee (a bug, a damaged file) must not cost the client
            # the fast answer: it is told, as for any queue that cannot take the job.
            log.exception("storing job %s failed", spec.id)
            unstored = "the job could not be stored; see the server log"
            return None, QueueUnavailable(unstored, retry_after=self.retry_after_s)
        self._storing.ended()
        if job.fingerprint is not None and job.fingerprint != spec.fingerprint:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was sent before with another image or callback_url",
                idempotency_key=spec.idempotency_key,
            )
        return job, None

    async def cancel(self, job_id: str, client: str | None = None) -> Job:
        job_id = parse_job_id(job_id)
        await self._written(job_id)  # the job it answers with carries the fast answer too
        if self.private_jobs:
            await self.job(job_id, client)  # JobNotFound if it is another's
        job = _found(await self.store.cancel(job_id), job_id)
        if job.status in (JobStatus.DONE, JobStatus.FAILED):
            raise JobFinished(f"the job is already {job.status}", job_id=job_id)
        return job

    async def job(self, job_id: str, client: str | None = None) -> Job:
        """The job, as `client` (an API key's identity) may see it."""
        job_id = parse_job_id(job_id)
        await self._written(job_id)
        job = _found(await self.store.get(job_id), job_id)
        # A job stored before keys were set has no client, so private jobs show it to none.
        if self.private_jobs and job.owner != client:
            raise _not_found(job_id)  # as if it never existed: no other client learns it does
        return job

    async def wait(self, job_id: str, timeout_s: float, client: str | None = None) -> Job:
        """The job once it is finished, or as it is when `timeout_s` runs out or the server
        begins to shut down."""
        deadline = time.monotonic() + timeout_s
        async with self._watching(job_id, client) as watch:
            job = await self.job(job_id, client)
            while self._waits_on(job) and (left := deadline - time.monotonic()) > 0:
                await watch.wait(left)
                job = await self.job(job_id, client)
            return job

    @contextlib.asynccontextmanager
    async def follow(
        self, job_id: str, keepalive_s: float, client: str | None = None
    ) -> AsyncIterator[AsyncIterator[Job]]:
        """Watch a job: JobNotFound at once if there is none, else an iterator over its states:
        the current one, then the one after each wake-up (a change, or `keepalive_s` without
        one), until a terminal state, or until the server begins to shut down."""
        async with self._watching(job_id, client) as watch:
            first = await self.job(job_id, client)
            yield self._states(job_id, first, watch, keepalive_s)

    async def _states(
        self, job_id: str, job: Job, watch: Watch, keepalive_s: float
    ) -> AsyncIterator[Job]:
        yield job
        while self._waits_on(job):
            await watch.wait(keepalive_s)
            latest = await self._get_through_outage(job_id)
            if latest is None:
                return  # expired meanwhile, or shutting down
            job = latest
            yield job

    async def _get_through_outage(self, job_id: str) -> Job | None:
        """A stream outlives a store outage: it reads again until the store is back (its
        watch is woken then too), and ends only when the client leaves or shutdown begins."""
        while not self.draining:
            try:
                return await self.store.get(job_id)
            except QueueUnavailable:
                await asyncio.sleep(OUTAGE_RETRY_S)
        return None

    def _waits_on(self, job: Job) -> bool:
        return not job.status.terminal and not self.draining

    @contextlib.asynccontextmanager
    async def _watching(self, job_id: str, client: str | None) -> AsyncIterator[Watch]:
        """A watch on the job, bounded like requests (each holds a connection), and woken
        when shutdown begins. With shares, `client`'s watches are bounded too: one client's
        streams could have held every place, and the others got 503."""
        sharing = client if self._watching_clients.share else None
        self._refuse_watch(sharing)
        async with self.store.watch(parse_job_id(job_id)) as watch:
            self._watches.add(watch)
            if sharing is not None:
                self._watching_clients.add(sharing, 1)
            try:
                yield watch
            finally:
                self._watches.discard(watch)
                if sharing is not None:
                    self._watching_clients.add(sharing, -1)

    def _refuse_watch(self, client: str | None) -> None:
        share = self._watching_clients.share
        if client is not None and not self._watching_clients.allows(client):
            raise TooManyRequests(
                f"this API key's client has {share} streams and long-polls open, its share;"
                " close one first",
                retry_after=self.retry_after_s,
                limit=share,
            )
        if self.store.watchers >= self.max_watches:
            raise Overloaded(
                f"{self.max_watches} streams and long-polls are open, this server's limit",
                retry_after=self.retry_after_s,
            )

    def drain(self) -> None:
        """Shutdown has begun: end every stream and long-poll now, with the job as it is, so
        that the server's graceful wait is not spent holding them open (clients reconnect,
        to another proxy). Requests still being answered finish as usual."""
        self.draining = True
        for watch in self._watches:
            watch.wake()

    async def flush_stats(self) -> None:
        """Write the requests counted since the last flush to the store."""
        counts = self.seen.take()
        if not counts:
            return
        try:
            await self.store.add_counts(counts)
        except Exception:
            self.seen.put_back(counts)  # kept for the next flush
            raise

    async def stats(self) -> Stats:
        await self.flush_stats()
        counts = await self.store.counts()
        return Stats(self.gate, Agreement.from_counts(counts), counts)

    async def queue_stats(self) -> QueueStats:
        depth = await self.store.queue_depth()
        oldest = await self.store.oldest_unfinished_at()
        return QueueStats(depth, max(0.0, time.time() - oldest) if oldest is not None else 0.0)

    async def health(self, *, causes: bool) -> dict[str, str]:
        """Each model and the queue: "ok" or why not; with `causes`, what failed underneath
        too (see TandemError.cause), which only an operator may read."""
        report = {self.fast.name: OK, self.accurate_model: OK, "queue": OK}
        try:
            report["queue"] = await self._queue_health(causes)
            live = await self.store.live_models(WORKER_ALIVE_S)
        except QueueUnavailable as exc:
            report["queue"] = exc.told(with_cause=causes)
            report[self.accurate_model] = "unknown: the queue is unavailable"
            return report
        if self.worker_failure is not None:
            report[self.accurate_model] = self.worker_failure.told(with_cause=causes)
        elif self.accurate_model not in live:
            report[self.accurate_model] = "no live worker serves this model"
        return report

    async def _queue_health(self, causes: bool) -> str:
        try:
            await self.store.ping()
        except QueueFull as exc:  # it takes no new job (a disk low), yet its workers go on
            return exc.told(with_cause=causes)
        return OK


EnqueueResult = tuple[tuple[Job | None, Refusal | None], float]


class _PendingEnqueue:
    """An enqueue that the pool's thread starts once the image has decoded. Its methods run
    on the event loop only, so `abandon` and `start` cannot interleave."""

    def __init__(
        self, enqueue: Callable[[JobSpec, float], Awaitable[EnqueueResult]], spec: JobSpec
    ) -> None:
        self._enqueue, self._spec = enqueue, spec
        self._task: asyncio.Task[EnqueueResult] | None = None
        self._abandoned = False

    def start(self) -> None:
        if not self._abandoned:  # a deadline may have passed while the image decoded
            coroutine = self._enqueue(self._spec, time.perf_counter())
            self._task = asyncio.ensure_future(coroutine)

    def abandon(self) -> asyncio.Task[EnqueueResult] | None:
        self._abandoned = True
        return self._task

    def started(self) -> asyncio.Task[EnqueueResult]:
        assert self._task is not None  # started before the prediction could return
        return self._task


class _AnswerWrites:
    """Fast answers waiting to be added to their jobs, and the writes under way. Its methods
    run on the event loop only."""

    def __init__(
        self, write: Callable[[str, Prediction], Coroutine[Any, Any, None]], after_s: float
    ) -> None:
        self._write, self._after_s = write, after_s
        self._waiting: dict[str, Prediction] = {}
        self._writing: dict[str, asyncio.Task[None]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, job_id: str, prediction: Prediction) -> None:
        self._waiting[job_id] = prediction
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._after_s, self.start)

    def start(self) -> None:
        """Start writing every waiting answer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for job_id, prediction in self._waiting.items():
            task = asyncio.create_task(self._write(job_id, prediction))
            self._writing[job_id] = task
            task.add_done_callback(functools.partial(self._done, job_id))
        self._waiting.clear()

    def _done(self, job_id: str, task: asyncio.Task[None]) -> None:
        if self._writing.get(job_id) is task:
            del self._writing[job_id]

    async def written(self, job_id: str) -> None:
        """Once the job's answer, if this service holds one, is written."""
        if job_id in self._waiting:
            self.start()
        writing = self._writing.get(job_id)
        if writing is not None:
            await asyncio.shield(writing)

    async def drain(self) -> None:
        self.start()
        await asyncio.gather(*self._writing.values())


class _Clock:
    def __init__(self) -> None:
        self.started = time.perf_counter()

    def timings(self, decode_ms: float, prediction: Prediction, enqueue_ms: float) -> Timings:
        total_ms = _ms_since(self.started)
        return Timings(decode_ms, prediction.inference_ms, enqueue_ms, total_ms)


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def _found(job: Job | None, job_id: str) -> Job:
    if job is None:
        raise _not_found(job_id)
    return job


def _not_found(job_id: str) -> JobNotFound:
    return JobNotFound("no such job; it never existed or its result has expired", job_id=job_id)
