"""Tracking against a live `tally`: the older SDK's calls store events that the listing shows."""

import asyncio
import time
from decimal import Decimal

import pytest

from support import run, unique
from tally_sdk import AuthenticationError, PermissionDeniedError, UsageTracker, ValidationError


def tracker(tally, **options):
    return UsageTracker(api_key=tally.api_key, base_url=tally.ingest_url, query_url=tally.query_url, **options)


def test_each_track_call_stores_an_event_that_get_usage_lists(tally):
    user = unique("track")

    async def scenario():
        async with tracker(tally) as t:
            ids = [
                await t.track_llm(user_id=user, model="gpt-4o", input_tokens=100, output_tokens=50,
                                  metadata={"session_id": "chat-1"}, tags=["chat"]),
                await t.track_document(user_id=user, service_provider="document_ai", document_type="invoice",
                                       processing_type="data_extraction", pages_processed=5),
                await t.track_api(user_id=user, service_provider="internal", endpoint="/v1/search",
                                  method="post", response_time_ms=12),
                await t.track_custom(user_id=user, service_type="custom", service_provider="lab",
                                     event_type="render", metrics={"images": 3}),
            ]  # fmt: skip
            assert len(t.pending_events()) == 4, "fewer than batch_size events wait for a flush"
        # Leaving `async with` flushed; the listing shows every event once.
        async with tracker(tally) as t:
            usage = await t.get_usage(user_id=user)
        return ids, usage

    ids, usage = run(scenario())
    assert usage["total_count"] == 4
    by_id = {event["event_id"]: event for event in usage["events"]}
    assert set(by_id) == set(ids)
    llm, document, api, custom = (by_id[i] for i in ids)
    assert (llm["service_type"], llm["model"], llm["tags"]) == ("llm_service", "gpt-4o", ["chat"])
    assert llm["metrics"]["input_tokens"] == 100 and llm["metrics"]["output_tokens"] == 50
    assert isinstance(llm["total_cost"], Decimal), "gpt-4o is in the price catalog; money is Decimal"
    assert (document["service_type"], document["event_type"]) == ("document_processor", "processing")
    assert document["metadata"]["document_type"] == "invoice"
    assert (api["service_type"], api["metadata"]["method"], api["event_type"]) == ("api_service", "POST", "request")
    assert custom["metrics"]["images"] == 3


def test_get_usage_on_the_ingest_port_as_the_older_sdk_called_it(tally):
    user = unique("ingest-port")

    async def scenario():
        async with UsageTracker(api_key=tally.api_key, base_url=tally.ingest_url) as t:
            event_id = await t.track_llm(user_id=user, model="gpt-4o", input_tokens=1, output_tokens=1)
            await t.flush_events()
            return event_id, await t.get_usage(user_id=user, include_billing=True)

    event_id, usage = run(scenario())
    assert [event["event_id"] for event in usage["events"]] == [event_id]


def test_without_batching_each_event_is_sent_at_once(tally):
    user = unique("single")

    async def scenario():
        async with tracker(tally, enable_batching=False) as t:
            event_id = await t.track_llm(user_id=user, model="gpt-4o", input_tokens=10, output_tokens=5)
            listed = await t.get_usage(user_id=user)  # no flush needed
            with pytest.raises(ValidationError, match="latency_ms"):
                await t.track_llm(user_id=user, model="gpt-4o", input_tokens=1, output_tokens=1, latency_ms=-5)
            return event_id, listed

    event_id, listed = run(scenario())
    assert [event["event_id"] for event in listed["events"]] == [event_id]


def test_the_background_flush_sends_a_partial_batch(tally):
    user = unique("periodic")

    async def scenario():
        async with tracker(tally, batch_size=100, flush_interval=0.2) as t:
            await t.track_llm(user_id=user, model="gpt-4o", input_tokens=10, output_tokens=5)

            start = time.monotonic()
            while (await t.get_usage(user_id=user))["total_count"] != 1:
                assert time.monotonic() - start < 10, "the background flush did not send the event"
                await asyncio.sleep(0.05)
            assert t.pending_events() == []

    run(scenario())


def test_tenant_id_must_be_the_keys_tenant(tally):
    user = unique("tenant")

    async def scenario():
        async with tracker(tally, tenant_id="demo", enable_batching=False) as t:
            await t.track_llm(user_id=user, model="gpt-4o", input_tokens=1, output_tokens=1)
        async with tracker(tally, tenant_id="someone-else", enable_batching=False) as t:
            with pytest.raises(PermissionDeniedError):
                await t.track_llm(user_id=user, model="gpt-4o", input_tokens=1, output_tokens=1)
            with pytest.raises(PermissionDeniedError):
                await t.get_usage(user_id=user)

    run(scenario())


def test_a_wrong_key_fails_the_batch_for_good_without_retrying(tally):
    user = unique("badkey")

    async def scenario():
        t = UsageTracker(api_key="not-a-key", base_url=tally.ingest_url, retry_backoff=5.0)
        await t.track_llm(user_id=user, model="gpt-4o", input_tokens=1, output_tokens=1)
        with pytest.raises(AuthenticationError):
            await t.flush()
        assert t.pending_events() == [], "a refused batch is not kept for retries"
        [failed] = t.failed_events
        assert failed.status_code == 401
        await t.close()

    run(scenario())
