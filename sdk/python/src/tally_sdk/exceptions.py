"""Exceptions of the Tally SDK.

The names and constructor arguments are those of the older usage-tracking SDK, so ``except``
clauses written for it keep working. New here: :class:`PermissionDeniedError` (403),
:class:`PayloadTooLargeError` (413) and :class:`BufferFullError`.
"""

from typing import Any, Dict, List, Optional


class UsageTrackingError(Exception):
    """Base class of every error the SDK raises."""

    def __init__(
        self, message: str, status_code: Optional[int] = None, response: Optional[Dict[str, Any]] = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.response: Dict[str, Any] = response or {}


class RateLimitError(UsageTrackingError):
    """429 from Tally after the retries ran out (or a ``Retry-After`` longer than allowed)."""

    def __init__(
        self, message: str, retry_after: Optional[float] = None, response: Optional[Dict[str, Any]] = None
    ) -> None:
        super().__init__(message, status_code=429, response=response)
        self.retry_after = retry_after


class ValidationError(UsageTrackingError):
    """An event or parameter Tally (or the SDK, before sending) refuses; sending it again will not help."""

    def __init__(
        self, message: str, field_errors: Optional[List[Any]] = None, response: Optional[Dict[str, Any]] = None
    ) -> None:
        super().__init__(message, status_code=400, response=response)
        self.field_errors: List[Any] = field_errors or []


class AuthenticationError(UsageTrackingError):
    """401: the API key is missing, unknown, revoked or expired."""

    def __init__(self, message: str, response: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message, status_code=401, response=response)


class PermissionDeniedError(UsageTrackingError):
    """403: the key lacks the scope, or a ``tenant_id`` names another tenant than the key's."""

    def __init__(self, message: str, response: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message, status_code=403, response=response)


class PayloadTooLargeError(UsageTrackingError):
    """413: the batch has more events or bytes than Tally takes; lower ``batch_size``."""

    def __init__(self, message: str, response: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message, status_code=413, response=response)


class ServiceUnavailableError(UsageTrackingError):
    """Tally could not be reached (``status_code`` None), or answered 5xx or 408 until the retries
    ran out; ``retry_after`` is the last answer's ``Retry-After`` in seconds, if it had one."""

    def __init__(
        self,
        message: str,
        response: Optional[Dict[str, Any]] = None,
        status_code: Optional[int] = 503,
        retry_after: Optional[float] = None,
    ) -> None:
        super().__init__(message, status_code=status_code, response=response)
        self.retry_after = retry_after


class ConfigurationError(UsageTrackingError):
    """The SDK was configured with invalid arguments."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class RetryableError(UsageTrackingError):
    """A failure that may succeed later (kept for the older SDK's callers)."""


class BufferFullError(UsageTrackingError):
    """The in-memory buffer holds ``max_buffer`` events that Tally has not taken yet.

    Raised by ``track_*`` instead of dropping anything: the event that did not fit is in
    :attr:`event` (with its ``event_id`` and ``timestamp``), so the caller can keep it, send it
    later with ``track_event(event)`` (Tally stores it once), or drop it knowingly.
    """

    def __init__(self, message: str, event: Dict[str, Any]) -> None:
        super().__init__(message)
        self.event = event
