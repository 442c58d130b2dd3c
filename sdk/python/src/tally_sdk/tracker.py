"""The async client, :class:`UsageTracker`: the older SDK's class, on Tally."""

import asyncio
import contextlib
from datetime import date, datetime
from typing import Any, AsyncIterator, Awaitable, Dict, List, Optional, Tuple, Union, cast

import httpx

from . import _protocol
from ._base import TrackerBase, logger
from .exceptions import UsageTrackingError
from .models import AggregateResult, BillingSummary, FlushResult, TopUsers, Trends, UsageEvent, UsageList

Time = Union[datetime, date, str]


class UsageTracker(TrackerBase[Awaitable[str]]):
    """Async Tally client with the older SDK's interface.

    ``track_*`` returns the event id at once; events are sent in batches of ``batch_size`` (by
    the ``track_*`` call that fills a batch) and every ``flush_interval`` seconds in the
    background. ``flush()``/``flush_events()`` send what waits; ``close()`` (or leaving
    ``async with``) flushes and closes::

        async with UsageTracker(api_key=key, base_url="http://localhost:8000") as tracker:
            await tracker.track_llm(user_id="u1", model="gpt-4o", input_tokens=100, output_tokens=50)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client: Optional[httpx.AsyncClient] = None
        self._flush_lock: Optional[asyncio.Lock] = None
        self._flusher: Optional["asyncio.Task[None]"] = None

    __init__.__doc__ = TrackerBase.__init__.__doc__

    async def __aenter__(self) -> "UsageTracker":
        await self._ensure_client()
        self._start_flusher()
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        await self.close()

    async def _ensure_client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(headers=self._headers, timeout=self.timeout)
        return self._client

    def _lock(self) -> asyncio.Lock:
        # Made inside the running loop (Python 3.9 binds a lock to the loop current at creation).
        if self._flush_lock is None:
            self._flush_lock = asyncio.Lock()
        return self._flush_lock

    def _start_flusher(self) -> None:
        if self._flusher is None and self.enable_batching and not self._closed:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_periodically())

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            if self._buffer.waiting():
                await self._flush_quietly()

    async def close(self) -> None:
        """Stop the background flush, send every buffered event, and close the connections.

        Raises what the last flush raised (e.g. :class:`ServiceUnavailableError` when Tally
        stayed unreachable through the retries); the unsent events are then still in
        :meth:`pending_events`.
        """
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        try:
            if self.enable_batching and len(self._buffer):
                await self.flush()
        finally:
            self._closed = True
            if self._client is not None:
                await self._client.aclose()
                self._client = None

    aclose = close

    # -- sending --------------------------------------------------------------------------

    def _submit(self, event: Dict[str, Any]) -> Awaitable[str]:
        self._check_open()
        if not self.enable_batching:
            return self._send_one(event)
        self._buffer.add(event)  # raises BufferFullError under when_full="raise"
        return self._after_add(event["event_id"])

    async def _after_add(self, event_id: str) -> str:
        self._start_flusher()
        if self._buffer.waiting() >= self.batch_size:
            await self._flush_quietly()
        return event_id

    async def _send_one(self, event: Dict[str, Any]) -> str:
        url = f"{self.base_url}/api/v1/events"
        await self._request("POST", url, content=_protocol.encode(event))
        return str(event["event_id"])

    async def flush(self) -> FlushResult:
        """Send every waiting event, ``batch_size`` at a time, and say what Tally did with them.

        Events Tally rejects are in the result's ``rejected`` (and in :attr:`failed_events`,
        and passed to ``on_failure``); they are never resent. When Tally stays unreachable or
        busy through the retries, the batch goes back to the buffer unchanged and the error
        (:class:`ServiceUnavailableError`, :class:`RateLimitError`) is raised; a batch refused
        as a whole (401, 403, 413) is recorded as failed and the error raised.
        """
        total = FlushResult()
        async with self._lock():
            while True:
                batch = self._buffer.take(self.batch_size)
                if not batch:
                    return total
                total.add(await self._send_batch(batch))

    async def flush_events(self) -> int:
        """Send every waiting event now (the older SDK's name). Returns how many were sent."""
        return (await self.flush()).sent

    async def _flush_quietly(self) -> None:
        try:
            await self.flush()
        except UsageTrackingError as error:
            if _protocol.is_retryable_status(error.status_code):
                logger.warning("failed to flush events to tally (kept for the next flush): %s", error)
            # Refusals of a whole batch were logged with the events they failed.

    async def _send_batch(self, batch: List[Dict[str, Any]]) -> FlushResult:
        url = f"{self.base_url}/api/v1/events/batch"
        try:
            status, body = await self._request("POST", url, content=_protocol.encode({"events": batch}), batch=True)
        except UsageTrackingError as error:
            if _protocol.is_retryable_status(error.status_code):
                self._buffer.put_back(batch)
            else:
                self._buffer.done(batch)
                self._record_failures(_protocol.whole_batch_failed(batch, error))
            raise
        except BaseException:  # cancelled mid-request: the events wait for the next flush
            self._buffer.put_back(batch)
            raise
        self._buffer.done(batch)
        result = _protocol.batch_result(batch, body, status)
        self._record_failures(result.rejected)
        return result

    async def _request(
        self,
        method: str,
        url: str,
        *,
        content: Optional[bytes] = None,
        params: Optional[Dict[str, str]] = None,
        batch: bool = False,
    ) -> Tuple[int, Any]:
        """One request with bounded retries; returns (status, decoded body) or raises."""
        client = await self._ensure_client()
        attempt = 0
        while True:
            try:
                response = await client.request(method, url, content=content, params=params)
            except httpx.TransportError as error:  # connection refused or reset, timeouts
                verdict = self._transport_verdict(error)
            else:
                verdict = _protocol.judge(response.status_code, response.text, response.headers, batch)
                if verdict.error is None:
                    return response.status_code, verdict.body
            delay = self._next_delay(verdict, attempt)
            if delay is None:
                assert verdict.error is not None
                raise verdict.error
            logger.debug("retrying %s %s in %.2f s: %s", method, url, delay, verdict.error)
            await asyncio.sleep(delay)
            attempt += 1

    async def _get(self, base: str, path: str, params: Dict[str, Any]) -> Any:
        _, body = await self._request("GET", base + path, params=_protocol.query_params(params))
        return body

    # -- queries --------------------------------------------------------------------------

    async def get_usage(
        self,
        tenant_id: Optional[str] = None,
        start_date: Optional[Time] = None,
        end_date: Optional[Time] = None,
        service_type: Optional[str] = None,
        service_provider: Optional[str] = None,
        user_id: Optional[str] = None,
        limit: int = 1000,
        offset: int = 0,
        include_billing: bool = False,
        *,
        model: Optional[str] = None,
        event_type: Optional[str] = None,
        status: Optional[str] = None,
        cursor: Optional[str] = None,
    ) -> UsageList:
        """Raw events, newest first (``GET /api/v1/usage``), as the older SDK's ``get_usage``.

        Dates default to the last 30 days; a date or time without offset is read in the
        tenant's time zone. For the next page pass ``cursor=result["next_cursor"]`` (fast at
        any depth), or use :meth:`iter_usage`.
        """
        params = _protocol.usage_params(
            tenant_id or self.tenant_id, start_date, end_date, service_type, service_provider, user_id,
            limit, offset, include_billing, model, event_type, status, cursor,
        )  # fmt: skip
        return cast(UsageList, await self._get(self._usage_url, "/api/v1/usage", params))

    async def iter_usage(self, page_size: int = 1000, **filters: Any) -> AsyncIterator[UsageEvent]:
        """Every event matching ``filters`` (the arguments of :meth:`get_usage`), page by page."""
        cursor: Optional[str] = None
        while True:
            page = await self.get_usage(limit=page_size, cursor=cursor, **filters)
            for event in page.get("events", []):
                yield event
            cursor = page.get("next_cursor")
            if not page.get("has_more") or not cursor:
                return

    async def get_aggregates(
        self,
        period: str = "day",
        start_date: Optional[Time] = None,
        end_date: Optional[Time] = None,
        service_type: Optional[str] = None,
        service_provider: Optional[str] = None,
        user_id: Optional[str] = None,
        *,
        model: Optional[str] = None,
        event_type: Optional[str] = None,
        group_by: Optional[Union[str, List[str]]] = None,
        tenant_id: Optional[str] = None,
    ) -> AggregateResult:
        """Totals per period and group (``GET /api/v1/usage/aggregate``): event counts, cost,
        users, quantities, latency. ``group_by``: up to 3 of service_type, service_provider,
        model, user_id, event_type, or ``"none"`` (default: service_type,service_provider)."""
        params = _protocol.aggregate_params(
            tenant_id or self.tenant_id, period, start_date, end_date, service_type, service_provider,
            user_id, model, event_type, group_by,
        )  # fmt: skip
        return cast(
            AggregateResult,
            _protocol.normalize_aggregate(await self._get(self.query_url, "/api/v1/usage/aggregate", params)),
        )

    async def get_trends(
        self,
        metric: str = "event_count",
        period: str = "day",
        start_date: Optional[Time] = None,
        end_date: Optional[Time] = None,
        service_type: Optional[str] = None,
        *,
        service_provider: Optional[str] = None,
        model: Optional[str] = None,
        user_id: Optional[str] = None,
        tenant_id: Optional[str] = None,
    ) -> Trends:
        """A metric per period and its direction (``GET /api/v1/analytics/trends``). ``metric``:
        event_count, total_cost, unique_users, error_count, error_rate, latency_avg/p50/p95/p99,
        a quantity name, or ``custom:<name>``."""
        params = _protocol.trends_params(
            tenant_id or self.tenant_id, metric, period, start_date, end_date, service_type,
            service_provider, model, user_id,
        )  # fmt: skip
        return cast(
            Trends, _protocol.normalize_trends(await self._get(self.query_url, "/api/v1/analytics/trends", params))
        )

    async def get_top_users(
        self,
        by: str = "total_cost",
        limit: int = 10,
        start_date: Optional[Time] = None,
        end_date: Optional[Time] = None,
        *,
        service_type: Optional[str] = None,
        service_provider: Optional[str] = None,
        model: Optional[str] = None,
        event_type: Optional[str] = None,
        tenant_id: Optional[str] = None,
    ) -> TopUsers:
        """Users ranked by ``by`` (total_cost, event_count, error_count, a quantity, or
        ``custom:<name>``) (``GET /api/v1/analytics/top-users``)."""
        params = _protocol.top_users_params(
            tenant_id or self.tenant_id, by, limit, start_date, end_date, service_type, service_provider,
            model, event_type,
        )  # fmt: skip
        body = await self._get(self.query_url, "/api/v1/analytics/top-users", params)
        return cast(TopUsers, _protocol.normalize_top_users(body))

    async def get_billing_summary(
        self, month: Optional[Union[str, date]] = None, *, tenant_id: Optional[str] = None
    ) -> BillingSummary:
        """A month's bill (``GET /api/v1/billing/summary``); ``month`` is ``"YYYY-MM"`` or a date
        in it, default the current month in the tenant's time zone. Money is Decimal."""
        params = _protocol.billing_params(tenant_id or self.tenant_id, month)
        return cast(BillingSummary, await self._get(self.query_url, "/api/v1/billing/summary", params))
