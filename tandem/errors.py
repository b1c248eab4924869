"""Domain errors. Each carries a stable machine code and an HTTP status.

Only the API's exception handlers turn these into responses; everything else raises them.
"""

from __future__ import annotations

from typing import Any, ClassVar


class TandemError(Exception):
    """Base of every error Tandem reports to a user."""

    status: int = 500
    code: ClassVar[str] = "internal_error"
    request_id: str | None = None  # set on errors the client reads off the wire

    def __init__(self, message: str, *, cause: str = "", **details: Any) -> None:
        # str(error) is the operator's account, for logs; a client reads `message` alone.
        super().__init__(f"{message}: {cause}" if cause else message)
        self.message = message
        # What failed underneath (a Redis client's error names its host and port): logged,
        # and shown to an authorised caller of /health/all, never put in a response body.
        self.cause = cause
        self.details = details

    def told(self, *, with_cause: bool) -> str:
        """The message, and with `with_cause` what failed underneath, for one who may read it."""
        return str(self) if with_cause else self.message


class InvalidRequest(TandemError):
    """A request HTTP itself rejects; carries the status the framework chose."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str, http_status: int = 400, **details: Any) -> None:
        super().__init__(message, **details)
        self.status = http_status


class InvalidJSON(TandemError):
    status = 400
    code = "invalid_json"


class InvalidMultipart(TandemError):
    status = 400
    code = "invalid_multipart"


class ValidationFailed(TandemError):
    status = 422
    code = "validation_error"


class InvalidBase64(TandemError):
    status = 422
    code = "invalid_base64"


class InvalidImage(TandemError):
    status = 422
    code = "invalid_image"


class ImageTooSmall(TandemError):
    status = 422
    code = "image_too_small"


class ImageTooComplex(TandemError):
    """An image whose structure would cost the decoder far more than its pixels: too many
    scans in a progressive JPEG, or too many parts in a JPEG, PNG or GIF container."""

    status = 422
    code = "image_too_complex"


class IdempotencyKeyReused(TandemError):
    """The key came with another image or callback URL: its job is another request's."""

    status = 422
    code = "idempotency_key_reused"


class CallbackNotAllowed(TandemError):
    status = 422
    code = "callback_not_allowed"


class UnsupportedImageFormat(TandemError):
    status = 415
    code = "unsupported_image_format"


class UnsupportedMediaType(TandemError):
    status = 415
    code = "unsupported_media_type"


class ImageTooLarge(TandemError):
    status = 413
    code = "image_too_large"


class PayloadTooLarge(TandemError):
    status = 413
    code = "payload_too_large"


class HeadTooLarge(TandemError):
    """A request line and headers longer than the server reads."""

    status = 431
    code = "headers_too_large"

    def __init__(self, max_bytes: int) -> None:
        super().__init__(
            f"the request line and headers are longer than {max_bytes} bytes", max_bytes=max_bytes
        )


class ReceiveTimeout(TandemError):
    """A request's head or body still arriving when its time ran out (a client stalled)."""

    status = 408
    code = "receive_timeout"

    def __init__(self, part: str, seconds: float) -> None:
        super().__init__(
            f"the request's {part} did not arrive within {round(seconds, 1):g} s",
            seconds=round(seconds, 3),
        )


class Unauthorized(TandemError):
    status = 401
    code = "unauthorized"


class Overloaded(TandemError):
    status = 503
    code = "overloaded"


class TooManyRequests(TandemError):
    """One client (API key) holds its share of the service: the others are served."""

    status = 429
    code = "too_many_requests"


class TooManyQueued(TooManyRequests):
    """One client (API key) has its share of the queue unfinished: its new job is refused,
    though the fast answer still goes back, and the others' jobs are still taken."""

    code = "too_many_queued"


class Timeout(TandemError):
    status = 504
    code = "timeout"


class NotFound(TandemError):
    status = 404
    code = "not_found"


class JobNotFound(NotFound):
    code = "job_not_found"


class JobFinished(TandemError):
    status = 409
    code = "job_finished"


class MethodNotAllowed(TandemError):
    status = 405
    code = "method_not_allowed"


class ServiceUnavailable(TandemError):
    status = 503
    code = "service_unavailable"


class QueueUnavailable(ServiceUnavailable):
    code = "queue_unavailable"


class QueueFull(ServiceUnavailable):
    code = "queue_full"


class DiskLow(QueueFull):
    """The embedded store's disk is below its free-space floor: no new job, but workers go on
    finishing queued ones, which frees room."""

    code = "disk_low"


class UnreadableJob(TandemError):
    """A stored job this version of Tandem cannot read: written by a newer one, or damaged."""

    code = "unreadable_job"
    reason: str = ""  # what failed to parse; not on the wire (error_from_wire leaves it empty)

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job {job_id}'s stored record cannot be read: {reason}", job_id=job_id)
        self.reason = reason


class InvalidModelOutput(TandemError):
    """A model gave scores that are not finite (NaN or infinity): a fault of the model, not of
    the image, which no retry mends."""

    code = "invalid_model_output"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"the model {model} gave scores that are not finite (NaN or infinity)", model=model
        )


class ConfigurationError(TandemError):
    """Settings or model files are wrong; raised at start-up, never per request."""

    code = "configuration_error"


class ModelNotFound(ConfigurationError):
    code = "model_not_found"


class CopyFailed(TandemError):
    """`tandem backup` or `tandem restore` could not copy the job store; a command's error,
    never a request's."""

    code = "copy_failed"


class UnreadableFile(TandemError):
    """`tandem predict` could not read an image file; a command's error, never a request's."""

    code = "unreadable_file"


class ServerUnreachable(TandemError):
    """Raised by the client when no HTTP answer came back at all."""

    status = 503
    code = "server_unreachable"


def _subclasses(cls: type[TandemError]) -> list[type[TandemError]]:
    return [cls, *(sub for direct in cls.__subclasses__() for sub in _subclasses(direct))]


def error_from_wire(status: int | None, body: object) -> TandemError:
    """The typed error an error body names: the client side of the one error shape. An unknown
    code gives a plain TandemError that keeps the code in its details. Without an HTTP status
    (an event stream's last event), the error's class gives it."""
    detail = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        detail = {"message": f"HTTP {status} without an error body"}
    code = str(detail.get("code", ""))
    details = detail.get("details")
    cls = {c.code: c for c in _subclasses(TandemError)}.get(code, TandemError)
    # Built without the subclass's own __init__: the wire gives message and details only.
    error = cls.__new__(cls)
    TandemError.__init__(error, str(detail.get("message", "")), **(details or {}))
    if status is not None:
        error.status = status
    error.request_id = detail.get("request_id")
    if cls is TandemError:
        error.details["code"] = code
    return error
