"""The SDK's protocol rules, without a server: events, money, retry decisions, batch answers."""

import random
import re
from datetime import datetime, timezone
from decimal import Decimal

import pytest

from tally_sdk import (
    AuthenticationError,
    BufferFullError,
    ConfigurationError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    SyncUsageTracker,
    ValidationError,
    WhenFull,
    _events,
    _protocol,
)
from tally_sdk._buffer import EventBuffer

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def test_events_carry_an_id_and_a_utc_timestamp_and_leave_out_none():
    event = _events.llm_event(
        None, "u1", "gpt-4o", 100, 50, None, None, None, None, "openai", "completion", None, None,
        {"session": "s", "dropped": None}, None,
    )  # fmt: skip
    assert re.match(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$", event["event_id"])
    assert RFC3339_UTC.match(event["timestamp"])
    assert "tenant_id" not in event
    assert event["metrics"] == {"input_tokens": 100, "output_tokens": 50, "total_tokens": 150}
    assert event["metadata"] == {"model": "gpt-4o", "session": "s"}
    assert "latency_ms" not in event["metrics"]


def test_timestamps_are_utc_whatever_the_input_zone():
    naive = datetime(2024, 1, 15, 10, 30, 0)
    assert _events.utc_timestamp(naive) == "2024-01-15T10:30:00.000000Z"
    aware = datetime(2024, 1, 15, 12, 30, 0, tzinfo=timezone.utc).astimezone()
    assert _events.utc_timestamp(aware) == "2024-01-15T12:30:00.000000Z"


def test_events_are_checked_as_the_older_sdk_checked_them():
    with pytest.raises(ValidationError, match="model is required"):
        _events.llm_event(None, "u", None, 1, 1, None, None, None, None, "openai", "completion", None, None, None, None)
    with pytest.raises(ValidationError, match="pages_processed"):
        _events.document_event(
            None, "u", "p", "invoice", "ocr", 0, None, None, None, None, "processing", None, None, None, None
        )
    with pytest.raises(ValidationError, match="event_type is required"):
        _events.custom_event(None, "u", "custom", "p", None, None, None, None, None, None)


def test_a_raw_event_keeps_its_id_and_timestamp():
    original = {"event_id": "0190b6d8-2f6a-7c3e-9f00-000000000001", "timestamp": "2024-01-15T10:30:00Z",
                "user_id": "u", "service_type": "custom", "metrics": {"x": 1, "y": None}}  # fmt: skip
    event = _events.raw_event(original, "demo")
    assert event["event_id"] == original["event_id"]
    assert event["timestamp"] == original["timestamp"]
    assert event["tenant_id"] == "demo"
    assert event["metrics"] == {"x": 1}
    assert original["metrics"] == {"x": 1, "y": None}, "the caller's event is not changed"


def test_money_is_decimal_as_string_or_number():
    as_string = _protocol.decode('{"total_cost": "0.0035", "rows": [{"usage_cost": "12.5"}], "n": 3}')
    as_number = _protocol.decode('{"total_cost": 0.0035, "rows": [{"usage_cost": 12.5}], "n": 3}')
    for body in (as_string, as_number):
        assert body["total_cost"] == Decimal("0.0035") and isinstance(body["total_cost"], Decimal)
        assert body["rows"][0]["usage_cost"] == Decimal("12.5")
        assert body["n"] == 3 and isinstance(body["n"], int)
    # A number never passes through float: digits beyond a double's precision survive.
    assert _protocol.decode('{"total_cost": 0.12345678901234567890}')["total_cost"] == Decimal("0.12345678901234567890")
    assert _protocol.decode('{"total_cost": null}')["total_cost"] is None


def test_retry_after_in_seconds_or_as_a_date():
    assert _protocol.parse_retry_after("3") == 3.0
    assert _protocol.parse_retry_after(None) is None
    assert _protocol.parse_retry_after("soon") is None
    assert _protocol.parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0


def test_backoff_is_exponential_jittered_bounded_and_honours_retry_after():
    policy = _protocol.RetryPolicy(max_retries=10, retry_backoff=1.0, backoff_max=8.0)
    rng = random.Random(7)
    for attempt in range(10):
        delay = policy.delay(attempt, None, rng)
        cap = min(8.0, 2.0**attempt)
        assert cap / 2 <= delay <= cap
    for _ in range(100):
        assert 5.0 <= policy.delay(0, 5.0, rng) <= 5.5


@pytest.mark.parametrize(
    "status, retry, error",
    [
        (200, False, None),
        (207, False, None),
        (202, False, None),
        (429, True, RateLimitError),
        (503, True, ServiceUnavailableError),
        (500, True, ServiceUnavailableError),
        (502, True, ServiceUnavailableError),
        (401, False, AuthenticationError),
        (403, False, PermissionDeniedError),
        (400, False, ValidationError),
    ],
)
def test_one_function_decides_what_is_retried(status, retry, error):
    verdict = _protocol.judge(status, '{"error": "x", "detail": "d"}', {"retry-after": "2"}, batch=True)
    assert verdict.retry is retry
    assert (verdict.error is None) if error is None else isinstance(verdict.error, error)
    if status in (429, 503):
        assert verdict.retry_after == 2.0


def test_a_batch_answer_400_with_results_is_an_answer_not_an_error():
    body = '{"processed_count": 0, "failed_count": 1, "results": [{"index": 0, "status": "rejected", "error": "e"}]}'
    verdict = _protocol.judge(400, body, {}, batch=True)
    assert verdict.error is None and verdict.body["failed_count"] == 1
    assert isinstance(_protocol.judge(400, body, {}, batch=False).error, ValidationError)


@pytest.mark.parametrize("status", [200, 207])
def test_batch_results_report_each_rejected_event(status):
    events = [{"event_id": f"id-{i}", "user_id": "u"} for i in range(3)]
    body = {
        "processed_count": 2,
        "failed_count": 1,
        "failed_events": [{"index": 1, "error": "temperature: must be from 0 to 2", "event_data": {}}],
        "results": [
            {"index": 0, "event_id": "id-0", "status": "stored"},
            {"index": 1, "event_id": None, "status": "rejected", "error": "temperature: must be from 0 to 2"},
            {"index": 2, "event_id": "id-2", "status": "duplicate"},
        ],
    }
    result = _protocol.batch_result(events, body, status)
    assert (result.sent, result.stored, result.duplicates) == (3, 1, 1)
    [failed] = result.rejected
    assert failed.event_id == "id-1" and failed.index == 1 and failed.event is events[1]
    assert "temperature" in failed.error and failed.status_code == 400
    # An answer with only the older failed_events list says the same.
    older = {key: value for key, value in body.items() if key != "results"}
    result = _protocol.batch_result(events, older, status)
    assert result.stored == 2 and [f.event_id for f in result.rejected] == ["id-1"]


def test_the_buffer_is_bounded_and_says_what_it_does_when_full():
    buffer = EventBuffer(2, WhenFull.RAISE)
    buffer.add({"event_id": "a"})
    batch = buffer.take(1)
    buffer.add({"event_id": "b"})
    with pytest.raises(BufferFullError) as raised:
        buffer.add({"event_id": "c"})  # one waiting and one in flight: full
    assert raised.value.event == {"event_id": "c"}
    buffer.put_back(batch)
    assert [e["event_id"] for e in buffer.snapshot()] == ["a", "b"], "a failed batch waits first in line"

    dropping = EventBuffer(2, WhenFull.DROP_OLDEST)
    for name in "abc":
        dropping.add({"event_id": name})
    assert [e["event_id"] for e in dropping.snapshot()] == ["b", "c"]
    assert dropping.dropped_events == 1


def test_query_urls_and_parameters():
    assert _protocol.derive_query_url("http://localhost:8000") == "http://localhost:8002"
    assert _protocol.derive_query_url("https://tally.example.com") == "https://tally.example.com"
    params = _protocol.query_params(
        _protocol.usage_params(
            None, datetime(2024, 1, 1), None, "llm_service", None, None, 10, 0, False, None, None, None, "abc"
        )  # fmt: skip
    )
    assert params == {"start_date": "2024-01-01T00:00:00", "service_type": "llm_service", "limit": "10",
                      "cursor": "abc", "include_billing": "false"}  # fmt: skip


def test_configuration_is_checked():
    with pytest.raises(ConfigurationError):
        SyncUsageTracker(api_key="")
    with pytest.raises(ConfigurationError):
        SyncUsageTracker(api_key="k", batch_size=10, max_buffer=5)
