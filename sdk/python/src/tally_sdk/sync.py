"""The sync client, :class:`SyncUsageTracker`: the same methods as :class:`UsageTracker`, without
``await``, for code that has no event loop (Django, Flask, scripts, Celery tasks)."""

import threading
import time
from datetime import date
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union, cast

import httpx

from . import _protocol
from ._base import TrackerBase, logger
from .exceptions import UsageTrackingError
from .models import AggregateResult, BillingSummary, FlushResult, TopUsers, Trends, UsageEvent, UsageList
from .tracker import Time


class SyncUsageTracker(TrackerBase[str]):
    """Blocking Tally client. Thread-safe: any thread may track events; a background thread
    flushes every ``flush_interval`` seconds. Use ``with`` or call :meth:`close` before exit
    (it flushes)::

        with SyncUsageTracker(api_key=key) as tracker:
            tracker.track_api(user_id="u1", service_provider="internal", endpoint="/v1/search")
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client = httpx.Client(headers=self._headers, timeout=self.timeout)
        self._flush_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._stop = threading.Event()
        self._flusher: Optional[threading.Thread] = None

    __init__.__doc__ = TrackerBase.__init__.__doc__

    def __enter__(self) -> "SyncUsageTracker":
        self._start_flusher()
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        self.close()

    def _start_flusher(self) -> None:
        with self._start_lock:
            if self._flusher is None and self.enable_batching and not self._closed:
                self._flusher = threading.Thread(target=self._flush_periodically, name="tally-sdk-flush", daemon=True)
                self._flusher.start()

    def _flush_periodically(self) -> None:
        while not self._stop.wait(self.flush_interval):
            if self._buffer.waiting():
                self._flush_quietly()

    def close(self) -> None:
        """Stop the background flush, send every buffered event, and close the connections.
        Raises what the last flush raised; unsent events are then in :meth:`pending_events`."""
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join()
            self._flusher = None
        try:
            if self.enable_batching and len(self._buffer):
                self.flush()
        finally:
            self._closed = True
            self._client.close()

    # -- sending --------------------------------------------------------------------------

    def _submit(self, event: Dict[str, Any]) -> str:
        self._check_open()
        if not self.enable_batching:
            self._request("POST", f"{self.base_url}/api/v1/events", content=_protocol.encode(event))
            return str(event["event_id"])
        self._buffer.add(event)  # raises BufferFullError under when_full="raise"
        self._start_flusher()
        if self._buffer.waiting() >= self.batch_size:
            self._flush_quietly()
        return str(event["event_id"])

    def flush(self) -> FlushResult:
        """Send every waiting event; see :meth:`UsageTracker.flush`."""
        total = FlushResult()
        with self._flush_lock:
            while True:
                batch = self._buffer.take(self.batch_size)
                if not batch:
                    return total
                total.add(self._send_batch(batch))

    def flush_events(self) -> int:
        """Send every waiting event now (the older SDK's name). Returns how many were sent."""
        return self.flush().sent

    def _flush_quietly(self) -> None:
        try:
            self.flush()
        except UsageTrackingError as error:
            if _protocol.is_retryable_status(error.status_code):
                logger.warning("failed to flush events to tally (kept for the next flush): %s", error)
            # Refusals of a whole batch were logged with the events they failed.

    def _send_batch(self, batch: List[Dict[str, Any]]) -> FlushResult:
        url = f"{self.base_url}/api/v1/events/batch"
        try:
            status, body = self._request("POST", url, content=_protocol.encode({"events": batch}), batch=True)
        except UsageTrackingError as error:
            if _protocol.is_retryable_status(error.status_code):
                self._buffer.put_back(batch)
            else:
                self._buffer.done(batch)
                self._record_failures(_protocol.whole_batch_failed(batch, error))
            raise
        except BaseException:
            self._buffer.put_back(batch)
            raise
        self._buffer.done(batch)
        result = _protocol.batch_result(batch, body, status)
        self._record_failures(result.rejected)
        return result

    def _request(
        self,
        method: str,
        url: str,
        *,
        content: Optional[bytes] = None,
        params: Optional[Dict[str, str]] = None,
        batch: bool = False,
    ) -> Tuple[int, Any]:
        """One request with bounded retries; returns (status, decoded body) or raises."""
        attempt = 0
        while True:
            try:
                response = self._client.request(method, url, content=content, params=params)
            except httpx.TransportError as error:
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
            time.sleep(delay)
            attempt += 1

    def _get(self, base: str, path: str, params: Dict[str, Any]) -> Any:
        _, body = self._request("GET", base + path, params=_protocol.query_params(params))
        return body

    # -- queries: see UsageTracker for the documentation of each ----------------------------

    def get_usage(
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
        """Raw events, newest first (``GET /api/v1/usage``); see :meth:`UsageTracker.get_usage`."""
        params = _protocol.usage_params(
            tenant_id or self.tenant_id, start_date, end_date, service_type, service_provider, user_id,
            limit, offset, include_billing, model, event_type, status, cursor,
        )  # fmt: skip
        return cast(UsageList, self._get(self._usage_url, "/api/v1/usage", params))

    def iter_usage(self, page_size: int = 1000, **filters: Any) -> Iterator[UsageEvent]:
        """Every event matching ``filters`` (the arguments of :meth:`get_usage`), page by page."""
        cursor: Optional[str] = None
        while True:
            page = self.get_usage(limit=page_size, cursor=cursor, **filters)
            yield from page.get("events", [])
            cursor = page.get("next_cursor")
            if not page.get("has_more") or not cursor:
                return

    def get_aggregates(
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
        """Totals per period and group; see :meth:`UsageTracker.get_aggregates`."""
        params = _protocol.aggregate_params(
            tenant_id or self.tenant_id, period, start_date, end_date, service_type, service_provider,
            user_id, model, event_type, group_by,
        )  # fmt: skip
        return cast(
            AggregateResult, _protocol.normalize_aggregate(self._get(self.query_url, "/api/v1/usage/aggregate", params))
        )

    def get_trends(
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
        """A metric per period and its direction; see :meth:`UsageTracker.get_trends`."""
        params = _protocol.trends_params(
            tenant_id or self.tenant_id, metric, period, start_date, end_date, service_type,
            service_provider, model, user_id,
        )  # fmt: skip
        return cast(Trends, _protocol.normalize_trends(self._get(self.query_url, "/api/v1/analytics/trends", params)))

    def get_top_users(
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
        """Users ranked by ``by``; see :meth:`UsageTracker.get_top_users`."""
        params = _protocol.top_users_params(
            tenant_id or self.tenant_id, by, limit, start_date, end_date, service_type, service_provider,
            model, event_type,
        )  # fmt: skip
        body = self._get(self.query_url, "/api/v1/analytics/top-users", params)
        return cast(TopUsers, _protocol.normalize_top_users(body))

    def get_billing_summary(
        self, month: Optional[Union[str, date]] = None, *, tenant_id: Optional[str] = None
    ) -> BillingSummary:
        """A month's bill; see :meth:`UsageTracker.get_billing_summary`."""
        params = _protocol.billing_params(tenant_id or self.tenant_id, month)
        return cast(BillingSummary, self._get(self.query_url, "/api/v1/billing/summary", params))
