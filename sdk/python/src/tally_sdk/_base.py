"""What the async and the sync client share: configuration, the ``track_*`` methods (which only
build an event and hand it to the client's ``_submit``), and the record of failed events."""

import logging
import random
from collections import deque
from typing import Any, Callable, Deque, Dict, Generic, List, Mapping, Optional, TypeVar, Union

from . import _events
from ._buffer import EventBuffer, WhenFull
from ._protocol import RetryPolicy, Verdict, derive_query_url
from .exceptions import ConfigurationError, ServiceUnavailableError, UsageTrackingError
from .models import FailedEvent

__version__ = "0.1.0"

logger = logging.getLogger("tally_sdk")

#: What ``track_*`` returns: ``str`` (the event id) for the sync client, an awaitable of it for
#: the async one.
R = TypeVar("R")

FailureCallback = Callable[[List[FailedEvent]], Any]


class TrackerBase(Generic[R]):
    """Configuration and event building shared by :class:`UsageTracker` and :class:`SyncUsageTracker`."""

    def __init__(
        self,
        api_key: str,
        base_url: str = "http://localhost:8000",
        tenant_id: Optional[str] = None,
        timeout: float = 30.0,
        max_retries: int = 3,
        retry_backoff: float = 1.0,
        enable_batching: bool = True,
        batch_size: int = 100,
        flush_interval: float = 5.0,
        *,
        query_url: Optional[str] = None,
        max_buffer: int = 10_000,
        when_full: Union[WhenFull, str] = WhenFull.RAISE,
        on_failure: Optional[FailureCallback] = None,
        backoff_max: float = 30.0,
        retry_after_max: float = 60.0,
        headers: Optional[Mapping[str, str]] = None,
    ) -> None:
        """Configure a client. Nothing is sent until the first event or query.

        Args:
            api_key: A Tally API key (scope ``ingest`` to track, ``query`` to query).
            base_url: Tally's ingest HTTP address (port 8000 by default).
            tenant_id: Optional. Tally takes the tenant from the API key; if given, it must name
                the key's tenant (its name or id), or Tally answers 403.
            timeout: Seconds per HTTP request.
            max_retries: Retries after the first attempt, for connection errors, timeouts, 408,
                429 and 5xx. Events keep their ``event_id``, so a retried event is stored once.
            retry_backoff: Seconds of the first backoff; doubled per retry, with jitter.
            enable_batching: Buffer events and send them in batches (``True``), or send each
                event on its own as it is tracked (``False``).
            batch_size: Events per batch; a ``track_*`` call that fills a batch flushes it.
            flush_interval: Seconds between background flushes of a partial batch.
            query_url: The query service (port 8002). Default: ``base_url`` with port 8000
                replaced by 8002. ``get_usage`` uses ``base_url`` unless this is given, as the
                older SDK did (``tally`` serves the listing on its ingest port too).
            max_buffer: Events held in memory at most (waiting plus in flight).
            when_full: ``"raise"`` (default): ``track_*`` raises :class:`BufferFullError` when
                ``max_buffer`` events wait; ``"drop_oldest"``: drop the oldest and count it.
            on_failure: Called with the events Tally refused for good (rejected in a batch, or
                a batch refused with 401/403/413), after each flush that had some.
            backoff_max: Longest backoff between retries, in seconds.
            retry_after_max: A ``Retry-After`` longer than this (seconds) is not waited for; the
                error is raised at once.
            headers: Extra HTTP headers for every request.
        """
        if not api_key:
            raise ConfigurationError("API key is required")
        if not base_url:
            raise ConfigurationError("Base URL is required")
        if batch_size < 1:
            raise ConfigurationError("batch_size must be at least 1")
        if max_buffer < batch_size:
            raise ConfigurationError("max_buffer must be at least batch_size")
        if flush_interval <= 0:
            raise ConfigurationError("flush_interval must be positive")
        if max_retries < 0:
            raise ConfigurationError("max_retries must not be negative")
        self.api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.query_url = (query_url or derive_query_url(self.base_url)).rstrip("/")
        self._usage_url = (query_url or self.base_url).rstrip("/")
        self.tenant_id = tenant_id
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.enable_batching = enable_batching
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.on_failure = on_failure
        self._policy = RetryPolicy(max_retries, retry_backoff, backoff_max, retry_after_max)
        self._rng = random.Random()
        self._buffer = EventBuffer(max_buffer, WhenFull(when_full))
        self._failed: Deque[FailedEvent] = deque(maxlen=max_buffer)
        self.rejected_count = 0
        self._headers = {
            "X-API-Key": api_key,
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"tally-sdk-python/{__version__}",
            **(headers or {}),
        }
        self._closed = False

    # -- what the clients implement -------------------------------------------------------

    def _submit(self, event: Dict[str, Any]) -> R:
        raise NotImplementedError

    # -- state ------------------------------------------------------------------------------

    @property
    def failed_events(self) -> List[FailedEvent]:
        """Events Tally refused for good, newest last (the last ``max_buffer`` of them; all of
        them went to ``on_failure``). ``rejected_count`` counts every one."""
        return list(self._failed)

    @property
    def dropped_events(self) -> int:
        """Events dropped to make room under ``when_full="drop_oldest"``."""
        return self._buffer.dropped_events

    def pending_events(self) -> List[Dict[str, Any]]:
        """Copies of the events waiting to be sent."""
        return self._buffer.snapshot()

    def _record_failures(self, failures: List[FailedEvent]) -> None:
        if not failures:
            return
        self._failed.extend(failures)
        self.rejected_count += len(failures)
        logger.warning(
            "tally refused %d event(s) for good: %s", len(failures), "; ".join(f.error for f in failures[:3])
        )
        if self.on_failure is not None:
            try:
                self.on_failure(failures)
            except Exception:  # a failing callback must not lose the flush's other results
                logger.exception("on_failure callback raised")

    def _next_delay(self, verdict: Verdict, attempt: int) -> Optional[float]:
        """Seconds to wait before retrying, or None to give up and raise ``verdict.error``."""
        if not verdict.retry or attempt >= self._policy.max_retries:
            return None
        if verdict.retry_after is not None and verdict.retry_after > self._policy.retry_after_max:
            return None
        return self._policy.delay(attempt, verdict.retry_after, self._rng)

    @staticmethod
    def _transport_verdict(error: Exception) -> Verdict:
        message = f"cannot reach Tally: {type(error).__name__}: {error}"
        return Verdict(retry=True, error=ServiceUnavailableError(message, status_code=None))

    def _check_open(self) -> None:
        if self._closed:
            raise UsageTrackingError("the tracker is closed")

    # -- tracking: the older SDK's methods, arguments and defaults -----------------------------

    def track_llm(
        self,
        tenant_id: Optional[str] = None,
        user_id: Optional[str] = None,
        model: Optional[str] = None,
        input_tokens: Optional[int] = None,
        output_tokens: Optional[int] = None,
        latency_ms: Optional[float] = None,
        temperature: Optional[float] = None,
        max_tokens: Optional[int] = None,
        model_version: Optional[str] = None,
        service_provider: str = "openai",
        event_type: str = "completion",
        session_id: Optional[str] = None,
        request_id: Optional[str] = None,
        metadata: Optional[Dict[str, Any]] = None,
        tags: Optional[List[str]] = None,
    ) -> R:
        """Track a language-model call (service type ``llm_service``).

        Returns the event's id (a UUID made here). Raises :class:`ValidationError` when a
        required argument is missing and :class:`BufferFullError` when the buffer is full.
        The argument order is the older SDK's (``tenant_id`` first): pass arguments by name.
        """
        event = _events.llm_event(
            tenant_id or self.tenant_id, user_id, model, input_tokens, output_tokens, latency_ms,
            temperature, max_tokens, model_version, service_provider, event_type, session_id,
            request_id, metadata, tags,
        )  # fmt: skip
        return self._submit(event)

    def track_document(
        self,
        tenant_id: Optional[str] = None,
        user_id: Optional[str] = None,
        service_provider: Optional[str] = None,
        document_type: Optional[str] = None,
        processing_type: Optional[str] = None,
        pages_processed: Optional[int] = None,
        characters_extracted: Optional[int] = None,
        processing_time_ms: Optional[float] = None,
        file_size_bytes: Optional[int] = None,
        file_format: Optional[str] = None,
        event_type: str = "processing",
        session_id: Optional[str] = None,
        request_id: Optional[str] = None,
        metadata: Optional[Dict[str, Any]] = None,
        tags: Optional[List[str]] = None,
    ) -> R:
        """Track document processing (service type ``document_processor``). Returns the event id."""
        event = _events.document_event(
            tenant_id or self.tenant_id, user_id, service_provider, document_type, processing_type,
            pages_processed, characters_extracted, processing_time_ms, file_size_bytes, file_format,
            event_type, session_id, request_id, metadata, tags,
        )  # fmt: skip
        return self._submit(event)

    def track_api(
        self,
        tenant_id: Optional[str] = None,
        user_id: Optional[str] = None,
        service_provider: Optional[str] = None,
        endpoint: Optional[str] = None,
        method: str = "GET",
        request_count: int = 1,
        response_time_ms: Optional[float] = None,
        payload_size_bytes: Optional[int] = None,
        response_size_bytes: Optional[int] = None,
        status_code: Optional[int] = None,
        api_version: Optional[str] = None,
        event_type: str = "request",
        session_id: Optional[str] = None,
        request_id: Optional[str] = None,
        metadata: Optional[Dict[str, Any]] = None,
        tags: Optional[List[str]] = None,
    ) -> R:
        """Track API requests (service type ``api_service``). Returns the event id."""
        event = _events.api_event(
            tenant_id or self.tenant_id, user_id, service_provider, endpoint, method, request_count,
            response_time_ms, payload_size_bytes, response_size_bytes, status_code, api_version,
            event_type, session_id, request_id, metadata, tags,
        )  # fmt: skip
        return self._submit(event)

    def track_custom(
        self,
        tenant_id: Optional[str] = None,
        user_id: Optional[str] = None,
        service_type: Optional[str] = None,
        service_provider: Optional[str] = None,
        event_type: Optional[str] = None,
        metrics: Optional[Dict[str, Any]] = None,
        metadata: Optional[Dict[str, Any]] = None,
        tags: Optional[List[str]] = None,
        session_id: Optional[str] = None,
        request_id: Optional[str] = None,
    ) -> R:
        """Track an event of any service type: ``custom``, or one registered with
        ``POST /api/v1/services``. Quantities go in ``metrics``. Returns the event id."""
        event = _events.custom_event(
            tenant_id or self.tenant_id, user_id, service_type, service_provider, event_type, metrics,
            metadata, tags, session_id, request_id,
        )  # fmt: skip
        return self._submit(event)

    def track_event(self, event: Mapping[str, Any]) -> R:
        """Track an event built by the caller, flat or nested, as Tally's ``POST /api/v1/events``
        takes it. An ``event_id`` and ``timestamp`` are added when missing; an event that has
        them keeps them, so resending one (e.g. from :attr:`BufferFullError.event`) is safe.
        Returns the event id."""
        return self._submit(_events.raw_event(event, self.tenant_id))
