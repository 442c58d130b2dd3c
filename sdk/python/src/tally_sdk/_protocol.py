"""The HTTP protocol without IO: encoding, decoding, which answers are retried and after how long,
and what a batch answer says about each event. The async and sync clients share all of it.
"""

import email.utils
import json
import random
import time
from dataclasses import dataclass
from datetime import date, datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from .exceptions import (
    AuthenticationError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    UsageTrackingError,
    ValidationError,
)
from .models import FailedEvent, FlushResult

#: Fields that hold money in Tally's answers: strings today, JSON numbers later; Decimal here.
MONEY_FIELDS = frozenset(
    {
        "total_cost",
        "usage_cost",
        "tiered_charges",
        "tiered_charge",
        "minimum_top_ups",
        "minimum_top_up",
        "minimum_charge",
        "shared_period_charges",
        "unattributed_cost",
        "period_charges",
        "cost",
    }
)

#: Statuses whose body answers the request (207: a partly rejected batch on older Tally builds).
ANSWERED = frozenset({200, 201, 202, 207})


def encode(payload: Any) -> bytes:
    """JSON bytes; made once per request so every retry sends the same bytes."""
    return json.dumps(payload, default=_json_default, separators=(",", ":")).encode("utf-8")


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def decode(text: Union[str, bytes]) -> Any:
    """JSON with every fractional number as Decimal and money fields as Decimal."""
    return money_to_decimal(json.loads(text, parse_float=Decimal))


def money_to_decimal(value: Any) -> Any:
    """Turns the money fields of a decoded answer into Decimal, in place, wherever they nest."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in MONEY_FIELDS and isinstance(item, (str, int, float)) and not isinstance(item, bool):
                value[key] = _to_decimal(item)
            else:
                money_to_decimal(item)
    elif isinstance(value, list):
        for item in value:
            money_to_decimal(item)
    return value


def _to_decimal(value: Union[str, int, float]) -> Any:
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return value


def query_params(values: Mapping[str, Any]) -> Dict[str, str]:
    """Query parameters without the ``None`` ones (Tally refuses empty values and unknown names)."""
    params: Dict[str, str] = {}
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            params[name] = "true" if value else "false"
        elif isinstance(value, (datetime, date)):
            params[name] = value.isoformat()
        elif isinstance(value, (list, tuple)):
            params[name] = ",".join(str(item) for item in value)
        else:
            params[name] = str(value)
    return params


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` header: a number of seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter.

    Attempt ``n`` (from 0) waits ``retry_backoff * 2**n`` seconds, at most ``backoff_max``, times a
    random factor from 0.5 to 1. A ``Retry-After`` on 429 or 503 is a floor: the wait is at least
    that long (plus up to 10% jitter), and a ``Retry-After`` over ``retry_after_max`` is not waited
    for: the error is raised at once with its ``retry_after``.
    """

    max_retries: int = 3
    retry_backoff: float = 1.0
    backoff_max: float = 30.0
    retry_after_max: float = 60.0

    def delay(self, attempt: int, retry_after: Optional[float], rng: random.Random) -> float:
        backoff = min(self.backoff_max, self.retry_backoff * (2.0**attempt)) * (0.5 + rng.random() / 2)
        if retry_after is None:
            return backoff
        return max(backoff, retry_after + rng.random() * min(1.0, retry_after * 0.1))


@dataclass
class Verdict:
    """What to do with an answer: use ``body``, or retry after ``delay`` seconds."""

    body: Any = None
    retry: bool = False
    retry_after: Optional[float] = None
    error: Optional[UsageTrackingError] = None


def judge(status: int, body_text: str, headers: Mapping[str, str], batch: bool) -> Verdict:
    """Decides, in one place, whether an answer is final, retryable, or a permanent error.

    Retryable: 408, 429, every 5xx. Final: 200/201/202/207, and for a batch a 400 that carries
    per-event ``results`` (every event rejected). Permanent otherwise.
    """
    body = _body(body_text)
    if status in ANSWERED:
        return Verdict(body=body)
    if batch and status == 400 and isinstance(body, dict) and isinstance(body.get("results"), list):
        return Verdict(body=body)
    message = _message(status, body)
    error_body = body if isinstance(body, dict) else {"error": "unknown", "message": body_text}
    if is_retryable_status(status):
        retry_after = parse_retry_after(headers.get("retry-after"))
        if status == 429:
            error: UsageTrackingError = RateLimitError(message, retry_after=retry_after, response=error_body)
        else:
            error = ServiceUnavailableError(message, error_body, status, retry_after)
        return Verdict(retry=True, retry_after=retry_after, error=error)
    return Verdict(error=permanent_error(status, message, error_body))


def is_retryable_status(status: Optional[int]) -> bool:
    """Whether sending the same request again later can succeed: no answer at all (``None``:
    connection refused or reset, timeout), 408, 429, or any 5xx. Decided here and nowhere else."""
    return status is None or status in (408, 429) or status >= 500


def permanent_error(status: int, message: str, body: Dict[str, Any]) -> UsageTrackingError:
    if status == 400:
        return ValidationError(message, field_errors=[body["detail"]] if "detail" in body else [], response=body)
    if status == 401:
        return AuthenticationError(message, response=body)
    if status == 403:
        return PermissionDeniedError(message, response=body)
    if status == 413:
        return PayloadTooLargeError(message, response=body)
    return UsageTrackingError(message, status_code=status, response=body)


def _body(text: str) -> Any:
    if not text:
        return None
    try:
        return decode(text)
    except ValueError:
        return text


def _message(status: int, body: Any) -> str:
    if isinstance(body, dict):
        for key in ("detail", "message", "error"):
            if isinstance(body.get(key), str):
                return f"{status}: {body[key]}"
    return f"request failed with status {status}"


def batch_result(events: Sequence[Dict[str, Any]], body: Any, status: int) -> FlushResult:
    """What a batch answer says about each event sent.

    Reads the per-event ``results`` (``stored``/``duplicate``/``accepted``/``rejected``); an answer
    with only the older ``failed_events`` list counts every event not listed there as stored.
    """
    result = FlushResult(sent=len(events))
    if not isinstance(body, dict):
        result.stored = len(events)
        return result
    results = body.get("results")
    if isinstance(results, list):
        for item in results:
            _count_one(result, events, item, status)
        return result
    failed = body.get("failed_events") or []
    for item in failed:
        _count_one(result, events, {**item, "status": "rejected"}, status)
    result.stored = len(events) - len(result.rejected)
    return result


def _count_one(result: FlushResult, events: Sequence[Dict[str, Any]], item: Any, status: int) -> None:
    if not isinstance(item, dict):
        return
    state = item.get("status")
    if state == "stored":
        result.stored += 1
    elif state == "duplicate":
        result.duplicates += 1
    elif state == "accepted":
        result.accepted += 1
    elif state == "rejected":
        index = item.get("index")
        event = events[index] if isinstance(index, int) and 0 <= index < len(events) else {}
        result.rejected.append(
            FailedEvent(
                event_id=event.get("event_id") or item.get("event_id"),
                error=str(item.get("error") or "rejected"),
                event=event,
                status_code=400 if status in ANSWERED or status == 400 else status,
                code=item.get("code"),
                index=index if isinstance(index, int) else None,
            )
        )


def whole_batch_failed(events: List[Dict[str, Any]], error: UsageTrackingError) -> List[FailedEvent]:
    """Every event of a request refused as a whole (401, 403, 413, ...)."""
    return [
        FailedEvent(
            event_id=event.get("event_id"),
            error=error.message,
            event=event,
            status_code=error.status_code or 0,
            code=error.response.get("error") if isinstance(error.response, dict) else None,
            index=index,
        )
        for index, event in enumerate(events)
    ]


def derive_query_url(base_url: str) -> str:
    """The query service next to an ingest URL: port 8000 becomes 8002 (the older system's and
    Tally's default ports); any other URL is used as it is."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(base_url)
    if parts.port == 8000:
        host = parts.netloc.rsplit(":", 1)[0]
        return urlunsplit(parts._replace(netloc=f"{host}:8002"))
    return base_url


def normalize_aggregate(body: Any) -> Any:
    """Rows under both ``aggregations`` and ``aggregates``."""
    if isinstance(body, dict):
        rows = body.get("aggregations", body.get("aggregates"))
        if rows is not None:
            body.setdefault("aggregations", rows)
            body.setdefault("aggregates", rows)
    return body


def normalize_trends(body: Any) -> Any:
    """Both ``trend``/``trend_direction`` and ``period``/``period_type``; money values as Decimal."""
    if isinstance(body, dict):
        for new, old in (("trend", "trend_direction"), ("period", "period_type")):
            if new in body and old not in body:
                body[old] = body[new]
            elif old in body and new not in body:
                body[new] = body[old]
        if body.get("metric") == "total_cost":
            for point in body.get("data_points") or []:
                if isinstance(point, dict) and isinstance(point.get("value"), str):
                    point["value"] = _to_decimal(point["value"])
    return body


def normalize_top_users(body: Any) -> Any:
    """Ranking values as Decimal when the ranking is by money."""
    if isinstance(body, dict) and body.get("by") == "total_cost":
        for user in body.get("users") or []:
            if isinstance(user, dict) and isinstance(user.get("value"), str):
                user["value"] = _to_decimal(user["value"])
    return body


Time = Union[datetime, date, str, None]


def usage_params(
    tenant_id: Optional[str],
    start_date: Time,
    end_date: Time,
    service_type: Optional[str],
    service_provider: Optional[str],
    user_id: Optional[str],
    limit: int,
    offset: int,
    include_billing: bool,
    model: Optional[str],
    event_type: Optional[str],
    status: Optional[str],
    cursor: Optional[str],
) -> Dict[str, Any]:
    """Parameters of ``GET /api/v1/usage`` (an offset of 0 is left out: Tally refuses an offset
    beside a cursor)."""
    return {
        "tenant_id": tenant_id,
        "start_date": start_date,
        "end_date": end_date,
        "service_type": service_type,
        "service_provider": service_provider,
        "user_id": user_id,
        "model": model,
        "event_type": event_type,
        "status": status,
        "limit": limit,
        "offset": offset or None,
        "cursor": cursor,
        "include_billing": include_billing,
    }


def aggregate_params(
    tenant_id: Optional[str],
    period: str,
    start_date: Time,
    end_date: Time,
    service_type: Optional[str],
    service_provider: Optional[str],
    user_id: Optional[str],
    model: Optional[str],
    event_type: Optional[str],
    group_by: Optional[Union[str, Sequence[str]]],
) -> Dict[str, Any]:
    return {
        "tenant_id": tenant_id,
        "period": period,
        "start_date": start_date,
        "end_date": end_date,
        "service_type": service_type,
        "service_provider": service_provider,
        "user_id": user_id,
        "model": model,
        "event_type": event_type,
        "group_by": group_by,
    }


def trends_params(
    tenant_id: Optional[str],
    metric: str,
    period: str,
    start_date: Time,
    end_date: Time,
    service_type: Optional[str],
    service_provider: Optional[str],
    model: Optional[str],
    user_id: Optional[str],
) -> Dict[str, Any]:
    return {
        "tenant_id": tenant_id,
        "metric": metric,
        "period": period,
        "start_date": start_date,
        "end_date": end_date,
        "service_type": service_type,
        "service_provider": service_provider,
        "model": model,
        "user_id": user_id,
    }


def top_users_params(
    tenant_id: Optional[str],
    by: str,
    limit: int,
    start_date: Time,
    end_date: Time,
    service_type: Optional[str],
    service_provider: Optional[str],
    model: Optional[str],
    event_type: Optional[str],
) -> Dict[str, Any]:
    return {
        "tenant_id": tenant_id,
        "by": by,
        "limit": limit,
        "start_date": start_date,
        "end_date": end_date,
        "service_type": service_type,
        "service_provider": service_provider,
        "model": model,
        "event_type": event_type,
    }


def billing_params(tenant_id: Optional[str], month: Optional[Union[str, date]]) -> Dict[str, Any]:
    if isinstance(month, date):
        month = f"{month.year:04d}-{month.month:02d}"
    return {"tenant_id": tenant_id, "month": month}
