"""Retries: a batch Tally stored but whose answer was lost is resent and counted once; 429/503 wait
for Retry-After; retries are bounded; refusals are not retried."""

import json

import pytest

from support import LossyProxy, Scripted, ScriptedServer, batch_answer, run, unique
from tally_sdk import RateLimitError, ServiceUnavailableError, SyncUsageTracker, UsageTracker


def assert_counted_once(tally, user, event_ids):
    """The listing and the aggregate both count each event exactly once."""

    async def check():
        async with UsageTracker(api_key=tally.api_key, base_url=tally.ingest_url, query_url=tally.query_url) as t:
            return await t.get_usage(user_id=user), await t.get_aggregates(user_id=user, group_by="none")

    usage, aggregate = run(check())
    assert usage["total_count"] == len(event_ids)
    assert sorted(event["event_id"] for event in usage["events"]) == sorted(event_ids)
    assert sum(row["event_count"] for row in aggregate["aggregations"]) == len(event_ids)


@pytest.mark.parametrize("mode", ["drop", "timeout", "502"])
def test_a_batch_whose_answer_was_lost_is_resent_and_counted_once(tally, mode):
    user = unique(f"retry-{mode}")
    with LossyProxy(tally.ingest_url, mode=mode, lose=1) as proxy:

        async def scenario():
            t = UsageTracker(api_key=tally.api_key, base_url=proxy.url, timeout=0.5, retry_backoff=0.05)
            ids = [await t.track_llm(user_id=user, model="gpt-4o", input_tokens=i + 1, output_tokens=1)
                   for i in range(3)]  # fmt: skip
            result = await t.flush()
            await t.close()
            return ids, result

        ids, result = run(scenario())
        posts = proxy.posts()
    assert len(posts) == 2, "the first answer was lost, so the batch went twice"
    assert posts[0].body == posts[1].body, "the retry resent the same events (same ids and timestamps)"
    assert sorted(e["event_id"] for e in json.loads(posts[0].body)["events"]) == sorted(ids)
    assert (result.sent, result.stored, result.duplicates, result.rejected) == (3, 0, 3, [])
    assert_counted_once(tally, user, ids)


def test_the_sync_client_retries_the_same_way(tally):
    user = unique("retry-sync")
    with LossyProxy(tally.ingest_url, mode="drop", lose=1) as proxy:
        with SyncUsageTracker(api_key=tally.api_key, base_url=proxy.url, retry_backoff=0.05) as t:
            ids = [t.track_api(user_id=user, service_provider="internal", endpoint="/v1/x") for _ in range(2)]
            result = t.flush()
        assert len(proxy.posts()) == 2
    assert result.duplicates == 2
    assert_counted_once(tally, user, ids)


def test_an_event_sent_alone_is_also_counted_once_after_a_lost_answer(tally):
    user = unique("retry-single")
    with LossyProxy(tally.ingest_url, mode="drop", lose=1) as proxy:
        with SyncUsageTracker(api_key=tally.api_key, base_url=proxy.url, enable_batching=False,
                              retry_backoff=0.05) as t:  # fmt: skip
            event_id = t.track_llm(user_id=user, model="gpt-4o", input_tokens=5, output_tokens=5)
        posts = proxy.posts("/api/v1/events")
    assert len(posts) == 2 and posts[0].body == posts[1].body
    assert_counted_once(tally, user, [event_id])


def answer_with_batch(requests):
    """A 200 batch answer naming the events of the last request."""
    return Scripted(200, batch_answer(json.loads(requests[-1].body)["events"]))


@pytest.mark.parametrize("status", [503, 429])
def test_retry_after_is_honoured(status):
    busy = Scripted(status, {"error": "busy", "detail": "queue full"}, {"Retry-After": "1"})
    with ScriptedServer([busy, answer_with_batch]) as server:

        async def scenario():
            async with UsageTracker(api_key="k", base_url=server.url, retry_backoff=0.01) as t:
                await t.track_custom(user_id="u", service_type="custom", service_provider="p", event_type="e")
                return await t.flush()

        result = run(scenario())
    first, second = server.requests
    waited = second.at - first.at
    assert 1.0 <= waited < 2.5, f"waited {waited:.2f} s for a Retry-After of 1 s"
    assert first.body == second.body
    assert result.stored == 1


def test_retries_are_bounded_and_the_events_are_kept():
    with ScriptedServer([Scripted(500, {"error": "internal", "detail": "boom"})]) as server:

        async def scenario():
            t = UsageTracker(api_key="k", base_url=server.url, max_retries=2, retry_backoff=0.01)
            event_id = await t.track_llm(user_id="u", model="m", input_tokens=1, output_tokens=1)
            with pytest.raises(ServiceUnavailableError) as raised:
                await t.flush()
            attempts = len(server.requests)
            pending = t.pending_events()
            with pytest.raises(ServiceUnavailableError):
                await t.close()  # the closing flush fails the same way, and says so
            return event_id, raised.value, attempts, pending, t.pending_events()

        event_id, error, attempts, pending, after_close = run(scenario())
    assert attempts == 3, "one attempt and max_retries=2 retries"
    assert error.status_code == 500
    assert [event["event_id"] for event in pending] == [event_id], "kept, unchanged, for the next flush"
    assert after_close == pending
    assert [json.loads(r.body)["events"][0]["event_id"] for r in server.requests] == [event_id] * 6


def test_a_retry_after_beyond_the_limit_is_not_waited_for():
    with ScriptedServer(
        [Scripted(429, {"error": "rate_limited", "detail": "slow down"}, {"Retry-After": "3600"})]
    ) as server:

        async def scenario():
            t = UsageTracker(api_key="k", base_url=server.url, retry_after_max=5)
            await t.track_llm(user_id="u", model="m", input_tokens=1, output_tokens=1)
            with pytest.raises(RateLimitError) as raised:
                await t.flush()
            assert len(t.pending_events()) == 1
            with pytest.raises(RateLimitError):
                await t.close()
            return raised.value

        error = run(scenario())
    assert error.retry_after == 3600
    assert len(server.requests) == 2, "one attempt per flush (the second at close), no waiting"
