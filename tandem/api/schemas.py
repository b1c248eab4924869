"""The wire format: request and response bodies, as documented at /docs."""

from __future__ import annotations

from dataclasses import asdict
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tandem.cascade import Gate, Policy
from tandem.jobs.records import Delivery, DeliveryState, Job, JobStatus
from tandem.predictions import Prediction
from tandem.service import FastOutcome, Stats


class PredictRequest(BaseModel):
    # Other fields are ignored, but kept so that /predict can refuse its options sent here.
    model_config = ConfigDict(extra="allow")

    image_data: str = Field(
        description="The image file (JPEG, PNG, ...), base64-encoded; a data: URL is accepted too.",
        examples=[
            "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFElEQVR4nGM8UaHBgA0wYRUdtBIAHicBeAYWg8oAAAAASUVORK5CYII="
        ],  # an 8x8 PNG
    )


class GateParams(BaseModel):
    """The query parameters that override the server's cascade gate for one request."""

    # `nan` had been refused as "less than or equal to 1": say what is wrong with it. A
    # misspelt parameter (`treshold`) had been ignored, and the request run on the server's
    # gate: POST is never cached, so no cache-buster needs letting through either.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    policy: Policy | None = Field(
        None, description="Cascade policy for this request (default: the server's)."
    )
    threshold: float | None = Field(
        None, ge=0, le=1, description="`when_unsure`: fast top-1 probability that is enough."
    )
    margin: float | None = Field(
        None, ge=0, le=1, description="`when_unsure`: also top-1 minus top-2."
    )

    def gate(self, default: Gate) -> Gate:
        """The server's gate, with whatever this request overrides."""
        return Gate(
            self.policy if self.policy is not None else default.policy,
            self.threshold if self.threshold is not None else default.threshold,
            self.margin if self.margin is not None else default.margin,
        )


class PredictParams(GateParams):
    """`POST /predict`'s query parameters."""

    callback_url: str | None = Field(
        None,
        max_length=2048,
        description="POST the result here once stored (a host on TANDEM_WEBHOOK_HOSTS), "
        "signed with HMAC-SHA256: see the README.",
    )


class ScoredLabel(BaseModel):
    index: int = Field(description="The model's output index.")
    label: str
    probability: float


class ModelAnswer(BaseModel):
    model: str
    label: str = Field(description="The top-1 class.")
    top_k: list[ScoredLabel]
    inference_ms: float

    @classmethod
    def of(cls, prediction: Prediction) -> ModelAnswer:
        return cls(
            model=prediction.model,
            label=prediction.label,
            top_k=[
                ScoredLabel(index=s.index, label=s.label, probability=s.probability)
                for s in prediction.top_k
            ],
            inference_ms=prediction.inference_ms,
        )


class JobRef(BaseModel):
    id: str
    status: JobStatus
    url: str = Field(description="Where the accurate answer will be: GET this.")


class TimingsOut(BaseModel):
    decode_ms: float
    fast_ms: float
    enqueue_ms: float
    total_ms: float


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. invalid_image.")
    message: str
    request_id: str | None = None
    details: dict[str, object] = Field(default_factory=dict)


class CascadeOut(BaseModel):
    """The policy that applied to this request, and whether it sent the image on."""

    policy: Policy
    threshold: float
    margin: float | None
    sent: bool = Field(description="Queued (or meant to be) for the accurate model.")
    reason: str | None = Field(None, description="Why not, when not sent.")

    @classmethod
    def of(cls, gate: Gate, skipped: str | None) -> CascadeOut:
        return cls(
            policy=gate.policy,
            threshold=gate.threshold,
            margin=gate.margin,
            sent=skipped is None,
            reason=skipped,
        )


class PredictResponse(BaseModel):
    """Also carries `"<fast model name>": "<label>"`, the original API's field.

    Under the `when_unsure` policy a confident fast answer gets no job: `job_id` and `job` are
    null, with status 200, and `cascade.reason` says why.

    With status 503 the fast answer is still here, but `job_id` and `job` are null and `error`
    says why the job was not queued (`queue_full`, `disk_low`, `queue_unavailable`): retry after
    `Retry-After` seconds, with the same `Idempotency-Key` if you sent one. So with status 429
    and `too_many_queued`: this API key has its share of the queue waiting or running.
    """

    model_config = ConfigDict(extra="allow")

    job_id: str | None = Field(
        description="128-bit id; the job is durably stored when this is sent. Null if not queued."
    )
    fast: ModelAnswer
    accurate_model: str
    job: JobRef | None
    timings: TimingsOut
    cascade: CascadeOut
    error: ErrorDetail | None = Field(
        None, description="Why no job could be queued, when the store refused it."
    )

    @classmethod
    def of(
        cls, outcome: FastOutcome, accurate_model: str, job_url: str, request_id: str | None
    ) -> PredictResponse:
        job, refusal = outcome.job, outcome.not_queued
        error = None
        if refusal is not None:
            error = ErrorDetail(
                code=refusal.code,
                message=refusal.message,
                request_id=request_id,
                details=refusal.details,
            )
        return cls.model_validate(
            {
                "job_id": job.id if job else None,
                outcome.prediction.model: outcome.prediction.label,
                "fast": ModelAnswer.of(outcome.prediction),
                "accurate_model": accurate_model,
                "job": JobRef(id=job.id, status=job.status, url=job_url) if job else None,
                "timings": TimingsOut(**asdict(outcome.timings)),
                "cascade": CascadeOut.of(outcome.gate, outcome.skipped),
                "error": error,
            }
        )


class LegacyPrediction(BaseModel):
    prediction: str = Field(description='The accurate label; "" until the job is done.')


class FinalAnswer(BaseModel):
    """The one field a client needs to show the best-known label."""

    label: str
    probability: float
    model: str
    source: Literal["accurate", "fast"]
    changed: bool = Field(description="The accurate answer differs from the fast one.")

    @classmethod
    def of(cls, job: Job) -> FinalAnswer | None:
        final = job.final
        if final is None:
            return None
        source: Literal["accurate", "fast"] = "accurate" if final is job.result else "fast"
        top = final.top_k[0]
        return cls(
            label=top.label,
            probability=top.probability,
            model=final.model,
            source=source,
            changed=job.changed,
        )


class WebhookOut(BaseModel):
    url: str
    state: DeliveryState = Field(description="pending until delivered or given up (failed).")
    attempts: int
    last_error: str | None = None

    @classmethod
    def of(cls, job: Job) -> WebhookOut:
        delivery = job.webhook or Delivery(DeliveryState.PENDING)
        return cls(
            url=job.callback_url or "",
            state=delivery.state,
            attempts=delivery.attempts,
            last_error=delivery.last_error,
        )


class JobResponse(BaseModel):
    """Also carries `"<job_id>": {"prediction": "<label>"}`, the original API's field."""

    model_config = ConfigDict(extra="allow")

    job_id: str
    status: JobStatus
    accurate: ModelAnswer | None = Field(
        None, description="The accurate model's answer, once done."
    )
    fast: ModelAnswer | None = Field(None, description="The fast answer given when it was queued.")
    final: FinalAnswer | None = Field(
        None, description="The accurate answer when there is one, else the fast one."
    )
    error: str | None = Field(None, description="Why the job failed, when it did.")
    cancel_requested: bool = Field(False, description="DELETE was called while it ran.")
    webhook: WebhookOut | None = Field(None, description="The callback, when one was asked.")
    attempts: int
    created_at: float
    finished_at: float | None = None

    @classmethod
    def of(cls, job: Job) -> JobResponse:
        label = job.result.label if job.result and job.status is JobStatus.DONE else ""
        return cls.model_validate(
            {
                job.id: LegacyPrediction(prediction=label),
                "job_id": job.id,
                "status": job.status,
                "accurate": ModelAnswer.of(job.result) if job.result else None,
                "fast": ModelAnswer.of(job.fast) if job.fast else None,
                "final": FinalAnswer.of(job),
                "error": job.error,
                "cancel_requested": job.cancel_requested,
                "webhook": WebhookOut.of(job) if job.callback_url else None,
                "attempts": job.attempts,
                "created_at": job.created_at,
                "finished_at": job.finished_at,
            }
        )


class ErrorBody(BaseModel):
    """The one shape of every error response."""

    error: ErrorDetail


class BucketOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # read from cascade.BucketStats
    low: float = Field(description="Fast top-1 probability from (inclusive) ...")
    high: float = Field(description="... to (exclusive, but 1.0 is in the last bucket).")
    requests: int = Field(description="Requests the fast model answered in this bucket.")
    judged: int = Field(description="Jobs in this bucket the accurate model answered.")
    agreement: float | None = Field(description="Share of judged jobs with the same top-1.")
    top5_agreement: float | None = Field(
        description="Share of judged jobs whose fast top-1 is in the accurate top-5."
    )


class ThresholdOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # read from cascade.ThresholdStats
    threshold: float
    sent_share: float | None = Field(
        description="Share of requests `when_unsure` at this threshold sends to the accurate model."
    )
    final_agreement: float | None = Field(
        description="Estimated share of final answers equal to the `always` policy's; null "
        "where a bucket it keeps has requests but no judged jobs."
    )


class StatsResponse(BaseModel):
    """Live agreement between the two models, from every proxy and worker on this store."""

    policy: Policy
    threshold: float
    margin: float | None
    requests: int
    judged: int
    agreement: float | None
    top5_agreement: float | None
    sent_share: float | None = Field(
        description="Share of requests the configured threshold would send on (by bucket)."
    )
    buckets: list[BucketOut]
    thresholds: list[ThresholdOut]
    jobs: dict[str, int] = Field(description="Jobs by outcome: done, failed, cancelled, retried.")

    @classmethod
    def of(cls, stats: Stats) -> StatsResponse:
        agreement, gate = stats.agreement, stats.gate
        return cls(
            policy=gate.policy,
            threshold=gate.threshold,
            margin=gate.margin,
            requests=agreement.requests,
            judged=agreement.judged,
            agreement=agreement.agreement,
            top5_agreement=agreement.top5_agreement,
            sent_share=agreement.at(gate.threshold).sent_share,
            buckets=[BucketOut.model_validate(b) for b in agreement.buckets],
            thresholds=[ThresholdOut.model_validate(t) for t in agreement.thresholds()],
            jobs={
                outcome: stats.counts.get(f"jobs_{outcome}", 0)
                for outcome in ("done", "failed", "cancelled", "retried")
            },
        )
