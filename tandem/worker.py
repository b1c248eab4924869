"""The accurate model's worker: claim a batch of jobs, classify them together, store the answers."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from tandem import __version__, heap, tasks, tracing
from tandem.cascade import judged_counts, late_judgement
from tandem.errors import InvalidModelOutput, QueueUnavailable, TandemError, UnreadableJob
from tandem.jobs.factory import make_store, store_location
from tandem.jobs.latency import answered_counts
from tandem.jobs.leases import Leases
from tandem.jobs.records import Claim, Delivery, DeliveryState, Job
from tandem.jobs.store import JobStore
from tandem.logs import counted
from tandem.outage import Outage
from tandem.predictions import Prediction
from tandem.runtime.abort import RunAbort
from tandem.runtime.classifier import Classifier, Spin, ThreadPlan, load_classifier
from tandem.runtime.imaging import ImageLimits, decode_image
from tandem.runtime.priority import GiveWay
from tandem.settings import Settings
from tandem.threads import pool
from tandem.webhooks import WebhookPolicy, WebhookSender

log = logging.getLogger("tandem.worker")

Tensor = npt.NDArray[np.float32]  # one image, prepared as the model's input
Answer = Prediction | InvalidModelOutput  # an image's accurate answer, or why it has none

HEARTBEAT_S = 5.0
PURGE_EVERY_S = 60.0
# Webhooks no worker is delivering, taken up at most this many per sweep.
DELIVERY_SWEEP_LIMIT = 100


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    batch_size: int = 4
    poll_s: float = 1.0
    top_k: int = 5
    limits: ImageLimits = field(default_factory=ImageLimits)
    job_timeout_s: float = 120.0
    # Niceness of the inference thread: beside the fast model (embedded mode), the accurate
    # model yields the CPU to it.
    nice: int = 0
    # Batches in the model at once, each run on its own thread: on 2 cores two single-threaded
    # runs side by side beat one run on both cores by a third (see Settings.worker_lane_count).
    lanes: int = 1
    # Threads that decode and preprocess a batch's images side by side; with one, a batch's
    # images are prepared one after another on its lane's thread.
    prepare_threads: int = 1
    # Run the model on each image of a batch alone: with one thread per run, batching does
    # not pay (see Worker._infer). Claims and stores still go by the batch.
    one_run_per_image: bool = False
    webhooks: WebhookPolicy = field(default_factory=WebhookPolicy)
    # How often to look for webhooks no worker is delivering (see WebhookPolicy).
    delivery_sweep_s: float = 30.0


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


class Worker:
    """Runs until `stop` is set; finishes the batch in hand before returning."""

    def __init__(
        self,
        store: JobStore,
        classifier: Classifier,
        config: WorkerConfig,
        give_way: GiveWay | None = None,
    ) -> None:
        self.store = store
        self.classifier = classifier
        self.config = config
        # Embedded beside the fast model: each step waits for it, and it preempts each run.
        self._give_way = give_way
        self.id = new_worker_id()
        self._leases = Leases(store, self.id)
        # A thread per lane, for its batch's preparing and model run: the loop stays free.
        self._executor = pool("tandem-worker", config.lanes, config.nice)
        self._preparers = (
            pool("tandem-prepare", config.prepare_threads, config.nice)
            if config.prepare_threads > 1
            else None
        )
        self._last_beat = 0.0
        self._webhooks = WebhookSender(store, config.webhooks)
        # Inference time and answers' latency for /metrics, written with the heartbeat rather
        # than per batch.
        self._counts: Counter[str] = Counter()
        self._last_purge = 0.0
        self._last_sweep = 0.0
        self._storing: asyncio.Task[None] | None = None
        self._claims = Outage(log, "claiming jobs")
        self._upkeep = Outage(log, "housekeeping")

    async def run(self, stop: asyncio.Event) -> None:
        log.info(
            "worker %s started for model %s, %d lane(s)",
            self.id,
            self.classifier.name,
            self.config.lanes,
        )
        # A pipeline: while the model runs on a batch in each lane, the next one is claimed and
        # earlier answers are stored. On stop, what is held is finished and stored.
        in_hand: set[asyncio.Task[None]] = set()
        keeper = asyncio.create_task(self._leases.keep(), name="tandem-leases")
        try:
            while not stop.is_set():
                await self._housekeeping()
                claims = await self._claim(stop)
                await self._free_lane(in_hand)
                if claims:
                    in_hand.add(asyncio.create_task(self._or_leave(self.process(claims), claims)))
        finally:
            await _finish(in_hand)
            await self.stored()
            await tasks.stop(keeper)
            with contextlib.suppress(QueueUnavailable):
                await self._flush_counts()
            await self._webhooks.close()
            self.close()
            log.info("worker %s stopped", self.id)

    async def _free_lane(self, in_hand: set[asyncio.Task[None]]) -> None:
        """Return once a lane is free, taking the finished batches out of `in_hand`; a batch
        that failed raises here."""
        while len(in_hand) >= self.config.lanes:
            done, _ = await asyncio.wait(in_hand, return_when=asyncio.FIRST_COMPLETED)
            in_hand -= done
            for task in done:
                task.result()

    def close(self) -> None:
        """Wait for the worker's threads; a batch still running in them finishes first."""
        self._executor.shutdown(wait=True)
        if self._preparers is not None:
            self._preparers.shutdown(wait=True)

    async def _flush_counts(self) -> None:
        counts, self._counts = self._counts, Counter()
        try:
            await self.store.add_counts(counts)
        except QueueUnavailable:
            self._counts.update(counts)
            raise

    async def _claim(self, stop: asyncio.Event) -> list[Claim]:
        """The next batch, waiting up to the poll for one; the wait ends once `stop` is set."""
        try:
            claims = await self.store.claim(
                self.id, self.config.batch_size, self.config.poll_s, until=stop
            )
        except QueueUnavailable as exc:
            self._claims.failed(f"{exc}; retrying every {self.config.poll_s:g} s")
            await tasks.first_set(stop, within_s=self.config.poll_s)
            return []
        self._claims.ended()
        self._leases.hold(claim.id for claim in claims)  # let go once their batch is done
        return claims

    async def _housekeeping(self) -> None:
        now = time.monotonic()
        try:
            if now - self._last_beat >= HEARTBEAT_S:
                await self.store.beat(self.id, self.classifier.name)
                await self._flush_counts()
                self._last_beat = now
            if now - self._last_purge >= PURGE_EVERY_S:
                purged = await self.store.purge_expired()
                self._last_purge = now
                if purged:
                    log.info("purged %d expired jobs", purged)
            if (
                self.config.webhooks.enabled
                and now - self._last_sweep >= self.config.delivery_sweep_s
            ):
                await self._take_up_deliveries()
                self._last_sweep = now
        except QueueUnavailable as exc:
            self._upkeep.failed(str(exc))
        else:
            self._upkeep.ended()

    async def _take_up_deliveries(self) -> None:
        """Post the finished jobs no worker is posting: never tried (they ended where no worker
        saw it, or a worker's finishing reply was lost) or stalled (their worker stopped)."""
        stalled = time.time() - self.config.webhooks.stalled_after_s
        for job in await self.store.undelivered(stalled, DELIVERY_SWEEP_LIMIT):
            # Marked first, so that other workers' sweeps leave it to this one.
            previous = job.webhook or Delivery(DeliveryState.PENDING)
            marked = replace(previous, state=DeliveryState.PENDING, updated_at=time.time())
            await self.store.record_delivery(job.id, marked)
            log.info("taking up the webhook of job %s", job.id, extra={"job_id": job.id})
            self._webhooks.send(job)

    async def process(self, claims: list[Claim]) -> None:
        """Decode each job, classify the decodable ones as one batch, store every outcome."""
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(self._executor, self._prepare_all, claims)
        ready: list[tuple[Claim, Tensor]] = []
        for claim, outcome in zip(claims, prepared, strict=True):
            if isinstance(outcome, TandemError):
                await self._fail(claim, outcome.message, retry=False)
            else:
                ready.append((claim, outcome))
        if ready:
            await self._classify(ready)

    def _prepare_all(self, claims: list[Claim]) -> list[Tensor | TandemError]:
        """Each job's model input, or why it has none. With one lane the images are decoded
        and preprocessed side by side, one thread per core: the model's run comes after and is
        parallel itself, so a batch prepared on one thread would leave the other cores idle.
        With a lane per core, the other lanes keep those cores busy."""
        if self._give_way is not None:
            self._give_way.wait()
        if self._preparers is None:
            return [self._prepare(claim) for claim in claims]
        return list(self._preparers.map(self._prepare, claims))

    def _prepare(self, claim: Claim) -> Tensor | TandemError:
        try:
            image = decode_image(claim.image, self.config.limits, self.classifier.decode_side)
            return self.classifier.tensor(image)
        except TandemError as exc:
            return exc
        except Exception as exc:  # a decoder's fault on one image fails that job, not the batch
            log.exception("preparing the image of job %s failed", claim.id)
            return TandemError(f"preparing the image failed: {exc!r}")

    async def _fail_all(
        self, ready: list[tuple[Claim, Tensor]], reason: str, *, retry: bool
    ) -> None:
        log.warning("%s failed: %s", counted(len(ready), "job"), reason)
        for claim, _ in ready:
            await self._fail(claim, reason, retry=retry)

    async def _fail(self, claim: Claim, reason: str, *, retry: bool) -> None:
        job = await self.store.fail(claim.id, reason, retry=retry)
        tracing.record_failed_run(claim.job, self.classifier.name, error=reason)
        if job is not None and job.status.terminal:  # its client hears of a failure too
            self._call_back(job)

    async def _classify(self, ready: list[tuple[Claim, Tensor]]) -> None:
        tensors = [tensor for _, tensor in ready]
        loop = asyncio.get_running_loop()
        runs = RunAbort()
        call = loop.run_in_executor(self._executor, self._infer, tensors, runs)
        try:
            answers, inference_s = await asyncio.wait_for(call, self.config.job_timeout_s)
        except TimeoutError:
            runs.abort()  # the lane's thread comes back once the run in progress stops
            reason = f"the accurate model did not finish within {self.config.job_timeout_s} s"
            await self._fail_all(ready, reason, retry=False)
            return
        except Exception as exc:  # ORT errors are untyped; the jobs get another worker's try
            log.exception("inference failed for %s", counted(len(ready), "job"))
            await self._fail_all(ready, f"inference failed: {exc}", retry=True)
            return
        self._counts.update(
            accurate_images=len(ready), accurate_inference_us=int(inference_s * 1e6)
        )
        answered = await self._fail_invalid(ready, answers)
        if answered:
            claims, predictions = zip(*answered, strict=True)
            await self._store_while_next_runs(list(claims), list(predictions))

    async def _fail_invalid(
        self, ready: list[tuple[Claim, Tensor]], answers: list[Answer]
    ) -> list[tuple[Claim, Prediction]]:
        """Fail the jobs whose scores were not finite, for good; return the others."""
        answered = []
        for (claim, _), answer in zip(ready, answers, strict=True):
            if isinstance(answer, Prediction):
                answered.append((claim, answer))
                continue
            log.error("job %s: %s", claim.id, answer.message, extra={"job_id": claim.id})
            await self._fail(claim, answer.message, retry=False)
        return answered

    def _infer(self, tensors: list[Tensor], runs: RunAbort) -> tuple[list[Answer], float]:
        """The batch's answers and the seconds the model ran. On one thread a batch is no
        faster per image, so a lane runs image by image (Lite2 on one thread: 68 images/s at
        batch 1, 67 at 4, 56 at 16, in the bench's scan); giving way, each run is preemptible,
        and a preempted run loses one image."""
        if self._give_way is not None:
            steps = (functools.partial(self._one, tensor, runs) for tensor in tensors)
            answers = [self._give_way.run(step) for step in steps]
        elif self.config.one_run_per_image:
            answers = [self._one(tensor, runs, None) for tensor in tensors]
        else:
            try:
                with runs.watching() as options:
                    batch = np.stack(tensors)
                    predictions = self.classifier.predict_tensors(
                        batch, self.config.top_k, run_options=options
                    )
                return list(predictions), predictions[0].inference_ms / 1000.0  # one run
            except InvalidModelOutput:  # which images: each alone
                answers = [self._one(tensor, runs, None) for tensor in tensors]
        ran_ms = sum(a.inference_ms for a in answers if isinstance(a, Prediction))
        return answers, ran_ms / 1000.0

    def _one(self, tensor: Tensor, runs: RunAbort, preemptible: ort.RunOptions | None) -> Answer:
        """A preemptible run has the cores to itself until a fast call stops it; one that
        waited out its patience runs beside the fast model, on one thread."""
        with runs.watching(preemptible) as options:
            try:
                predictions = self.classifier.predict_tensors(
                    tensor[np.newaxis],
                    self.config.top_k,
                    solo=preemptible is not None,
                    run_options=options,
                )
            except InvalidModelOutput as exc:
                return exc
        return predictions[0]

    async def _store_while_next_runs(
        self, claims: list[Claim], predictions: list[Prediction]
    ) -> None:
        """Start storing these answers, and return so that the next batch can run meanwhile.
        At most one batch is being stored: a slower store holds the model back, never piles
        answers up in memory."""
        # Another lane may start its store while this one waits: wait until none is running.
        while self._storing is not None and not self._storing.done():
            await self._storing
        self._leases.hold(claim.id for claim in claims)  # until stored, past their batch's end
        storing = self._store(claims, predictions)
        self._storing = asyncio.create_task(self._or_leave(storing, claims))

    async def stored(self) -> None:
        """Return once the answers being stored are: `process` returns before (see
        _store_while_next_runs)."""
        if self._storing is not None:
            await self._storing

    async def _or_leave(self, work: Awaitable[None], claims: list[Claim]) -> None:
        """Do `work` on these claims (their batch, or the storing of its answers), then let go
        of the hold it had on them."""
        try:
            await work
        except QueueUnavailable as exc:
            # The results could not be stored; the leases run out and the jobs come back.
            log.warning(
                "queue unavailable while finishing %s: %s", counted(len(claims), "job"), exc
            )
        finally:
            self._leases.release(claim.id for claim in claims)

    async def _store(self, claims: list[Claim], predictions: list[Prediction]) -> None:
        answers = {claim.id: answer for claim, answer in zip(claims, predictions, strict=True)}
        tallies = {
            claim.id: judged_counts(claim.job.fast, answers[claim.id])
            for claim in claims
            if claim.job.fast is not None
        }
        completed = await self.store.complete_many(answers, tallies)
        self._leases.finished(answers)  # stored, or finished by another worker first
        answered_at = time.time()
        for job_id in completed.untallied:
            await self._tally_late(job_id, answers[job_id])
        for claim in claims:
            extra = {"job_id": claim.id, "request_id": claim.job.request_id}
            if claim.id in completed.stored:
                self._counts.update(answered_counts(answered_at - claim.job.created_at))
                label = answers[claim.id].label
                with tracing.running(claim.job, self.classifier.name, label=label):
                    log.info("job %s done: %s", claim.id, label, extra=extra)
                await self._call_back_stored(claim)
            else:
                # Redelivered after its lease ran out, and another worker answered first.
                log.info("job %s was already finished; result dropped", claim.id, extra=extra)

    async def _tally_late(self, job_id: str, answer: Prediction) -> None:
        """A job is stored while the proxy's fast model runs, and its fast answer added after:
        one claimed in between is judged once both answers are stored."""
        job = await self._read_back(job_id)
        if job is not None and job.fast is not None:
            await self.store.add_counts(late_judgement(job.fast, answer))

    async def _call_back_stored(self, claim: Claim) -> None:
        if claim.job.callback_url is None:
            return
        job = await self._read_back(claim.id)  # as stored: done, or cancelled meanwhile
        if job is not None:
            self._call_back(job)

    async def _read_back(self, job_id: str) -> Job | None:
        """A job this worker has just finished, as stored. A newer version may have rewritten
        it meanwhile (a proxy of a later release adding the fast answer): its answer is stored,
        and what needs the record is skipped rather than stopping the worker."""
        try:
            return await self.store.get(job_id)
        except UnreadableJob as exc:
            log.error("%s; its webhook and agreement tally are skipped", exc.message)
            return None

    def _call_back(self, job: Job) -> None:
        if job.callback_url is not None:
            self._webhooks.send(job)


def config_from(settings: Settings) -> WorkerConfig:
    return WorkerConfig(
        batch_size=settings.worker_batch_size,
        poll_s=settings.worker_poll_s,
        top_k=settings.top_k,
        limits=settings.image_limits,
        job_timeout_s=settings.job_timeout_s,
        webhooks=settings.webhooks,
        lanes=settings.worker_lane_count,
        prepare_threads=settings.accurate_prepare_threads,
        one_run_per_image=settings.accurate_lane_threads == 1,
    )


async def _finish(in_hand: set[asyncio.Task[None]]) -> None:
    """Wait for the batches in hand; one that failed is logged, so the others still finish."""
    if not in_hand:
        return
    await asyncio.wait(in_hand)
    for task in in_hand:
        if not task.cancelled() and task.exception() is not None:
            log.error("a batch failed", exc_info=task.exception())


async def run_worker_process(settings: Settings) -> None:
    """`tandem worker`: serve the accurate model until SIGTERM or SIGINT, then finish the batch
    in hand and exit. Jobs claimed but not finished go back to the queue by their lease."""
    store = make_store(settings)
    await store.open()
    log.info("tandem %s worker; jobs in %s", __version__, store_location(settings))
    try:
        # Not spinning: ONNX Runtime's idle threads would spin on the cores that the next
        # batch's images are being prepared on.
        plan = ThreadPlan(settings.accurate_lane_threads, Spin.NEVER)
        classifier = await asyncio.to_thread(
            load_classifier, settings.accurate_model, settings.model_dir, plan
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        with heap.serving():
            await Worker(store, classifier, config_from(settings)).run(stop)
    finally:
        await store.close()
