"""Partly rejected batches, the bounded buffer, and close() flushing, against a live `tally`."""

import pytest

from support import LossyProxy, run, unique
from tally_sdk import BufferFullError, ServiceUnavailableError, SyncUsageTracker, UsageTracker


def listed_ids(tally, user):
    async def query():
        async with UsageTracker(api_key=tally.api_key, base_url=tally.ingest_url) as t:
            return await t.get_usage(user_id=user)

    usage = run(query())
    assert usage["total_count"] == len(usage["events"])
    return sorted(event["event_id"] for event in usage["events"])


def test_a_partly_rejected_batch_reports_the_bad_event_and_stores_the_good_ones(tally):
    user = unique("partial")
    reported = []
    with LossyProxy(tally.ingest_url) as proxy:

        async def scenario():
            t = UsageTracker(api_key=tally.api_key, base_url=proxy.url, on_failure=reported.extend)
            good = [await t.track_llm(user_id=user, model="gpt-4o", input_tokens=10, output_tokens=5)]
            # Latency is at most an hour: Tally rejects this event, and only this one.
            bad = await t.track_llm(user_id=user, model="gpt-4o", input_tokens=10, output_tokens=5,
                                    latency_ms=7_200_000)  # fmt: skip
            good.append(await t.track_api(user_id=user, service_provider="internal", endpoint="/v1/x"))
            result = await t.flush()
            again = await t.flush()
            await t.close()
            return good, bad, result, again, t.failed_events

        good, bad, result, again, failed = run(scenario())
        assert len(proxy.posts()) == 1, "a rejected event is never resent"
    assert (result.sent, result.stored, result.ok) == (3, 2, False)
    [rejected] = result.rejected
    assert rejected.event_id == bad and rejected.index == 1 and rejected.status_code == 400
    assert "latency_ms" in rejected.error
    assert rejected.event["metrics"]["latency_ms"] == 7_200_000
    assert failed == [rejected] and reported == [rejected]
    assert again.sent == 0
    assert listed_ids(tally, user) == sorted(good)


def test_a_batch_with_every_event_rejected_is_reported_not_retried(tally):
    user = unique("allbad")
    with LossyProxy(tally.ingest_url) as proxy:
        with SyncUsageTracker(api_key=tally.api_key, base_url=proxy.url) as t:
            bad = t.track_llm(user_id=user, model="gpt-4o", input_tokens=1, output_tokens=1, latency_ms=-1)
            result = t.flush()
        assert len(proxy.posts()) == 1
    assert [failed.event_id for failed in result.rejected] == [bad]
    assert t.failed_events == result.rejected and t.rejected_count == 1
    assert listed_ids(tally, user) == []


def test_a_full_buffer_refuses_the_event_and_loses_nothing(tally):
    user = unique("full")
    with LossyProxy(tally.ingest_url) as proxy:
        proxy.down = True  # Tally answers 503 for now

        async def scenario():
            t = UsageTracker(api_key=tally.api_key, base_url=proxy.url, batch_size=2, max_buffer=4,
                             max_retries=0)  # fmt: skip
            ids = [await t.track_llm(user_id=user, model="gpt-4o", input_tokens=1, output_tokens=1)
                   for _ in range(4)]  # fmt: skip
            with pytest.raises(BufferFullError) as raised:
                await t.track_llm(user_id=user, model="gpt-4o", input_tokens=1, output_tokens=1)
            refused = raised.value.event
            assert sorted(e["event_id"] for e in t.pending_events()) == sorted(ids)
            with pytest.raises(ServiceUnavailableError):
                await t.flush()
            proxy.down = False  # Tally is back: everything buffered goes, and the refused event too
            result = await t.flush()
            ids.append(await t.track_event(refused))
            await t.close()
            return ids, refused, result

        ids, refused, result = run(scenario())
        assert proxy.answered_503 >= 3
    assert refused["event_id"] == ids[-1], "the refused event kept its id when tracked again"
    assert result.stored == 4
    assert listed_ids(tally, user) == sorted(ids)


def test_drop_oldest_makes_room_and_counts_what_it_dropped():
    async def scenario():
        t = UsageTracker(api_key="k", base_url="http://127.0.0.1:9", batch_size=3, max_buffer=3,
                         when_full="drop_oldest", max_retries=0)  # fmt: skip
        # The third event fills a batch; its flush fails (nothing listens on port 9) and keeps it.
        ids = [await t.track_custom(user_id="u", service_type="custom", service_provider="p", event_type="e")
               for _ in range(4)]  # fmt: skip
        pending = [event["event_id"] for event in t.pending_events()]
        with pytest.raises(ServiceUnavailableError):
            await t.close()
        return ids, pending, t.dropped_events

    ids, pending, dropped = run(scenario())
    assert dropped == 1
    assert pending == ids[1:]


def test_close_flushes_what_waits(tally):
    user = unique("close")

    async def scenario():
        t = UsageTracker(api_key=tally.api_key, base_url=tally.ingest_url, batch_size=1000, flush_interval=3600)
        ids = [await t.track_llm(user_id=user, model="gpt-4o", input_tokens=1, output_tokens=1) for _ in range(5)]
        assert len(t.pending_events()) == 5
        await t.aclose()
        return ids

    ids = run(scenario())
    assert listed_ids(tally, user) == sorted(ids)

    user = unique("close-sync")
    t = SyncUsageTracker(api_key=tally.api_key, base_url=tally.ingest_url, batch_size=1000, flush_interval=3600)
    ids = [t.track_document(user_id=user, service_provider="docai", document_type="invoice",
                            processing_type="ocr", pages_processed=2) for _ in range(3)]  # fmt: skip
    t.close()
    assert listed_ids(tally, user) == sorted(ids)
