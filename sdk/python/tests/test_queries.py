"""The query API as typed methods, async and sync, against a live `tally`: usage pages, aggregates,
trends, top users and the bill, with money as Decimal."""

from datetime import datetime, timedelta, timezone
from decimal import Decimal

from support import run, unique
from tally_sdk import SyncUsageTracker, UsageTracker


def test_usage_pages_follow_the_cursor(tally):
    user = unique("pages")
    with SyncUsageTracker(api_key=tally.api_key, base_url=tally.ingest_url, query_url=tally.query_url) as t:
        ids = [t.track_llm(user_id=user, model="gpt-4o", input_tokens=i + 1, output_tokens=1) for i in range(5)]
        t.flush()
        first = t.get_usage(user_id=user, limit=2)
        second = t.get_usage(user_id=user, limit=2, cursor=first["next_cursor"])
        every = list(t.iter_usage(page_size=2, user_id=user))
        by_offset = t.get_usage(user_id=user, limit=2, offset=4)
    assert (first["total_count"], len(first["events"]), first["has_more"]) == (5, 2, True)
    assert not {e["event_id"] for e in first["events"]} & {e["event_id"] for e in second["events"]}
    assert sorted(event["event_id"] for event in every) == sorted(ids)
    assert len(by_offset["events"]) == 1 and by_offset["has_more"] is False


def test_aggregates_trends_top_users_and_the_bill(tally):
    # Priced by the built-in catalog (openai gpt-4o); this test's events are told apart by event type.
    kind = unique("chat").replace("-", "_")
    heavy, light = unique("heavy"), unique("light")
    now = datetime.now(timezone.utc)

    async def scenario():
        async with UsageTracker(api_key=tally.api_key, base_url=tally.ingest_url, query_url=tally.query_url) as t:
            for _ in range(3):
                await t.track_llm(user_id=heavy, model="gpt-4o", input_tokens=1000, output_tokens=500,
                                  event_type=kind, latency_ms=120)  # fmt: skip
            await t.track_llm(user_id=light, model="gpt-4o", input_tokens=10, output_tokens=5, event_type=kind)
            await t.flush()
            window = {"start_date": now - timedelta(days=1), "end_date": now + timedelta(days=1)}
            aggregate = await t.get_aggregates(period="day", event_type=kind, group_by="user_id", **window)
            trends = await t.get_trends(metric="event_count", period="hour", user_id=heavy, **window)
            top = await t.get_top_users(by="total_cost", limit=5, event_type=kind, **window)
            bill = await t.get_billing_summary()
            return aggregate, trends, top, bill

    aggregate, trends, top, bill = run(scenario())

    rows = {row["user_id"]: row for row in aggregate["aggregations"]}
    assert aggregate["aggregates"] == aggregate["aggregations"], "the older name is there too"
    assert (rows[heavy]["event_count"], rows[light]["event_count"]) == (3, 1)
    assert rows[heavy]["aggregated_metrics"]["input_tokens"] == 3000
    assert isinstance(rows[heavy]["total_cost"], Decimal) and rows[heavy]["total_cost"] > rows[light]["total_cost"] > 0

    assert sum(point["value"] for point in trends["data_points"] if point["value"] is not None) == 3
    assert trends["trend"] == trends["trend_direction"] and trends["period"] == trends["period_type"] == "hour"

    assert [user["user_id"] for user in top["users"]] == [heavy, light]
    assert all(isinstance(user["total_cost"], Decimal) for user in top["users"])
    assert top["users"][0]["value"] == top["users"][0]["total_cost"]

    for field in ("total_cost", "usage_cost", "tiered_charges", "minimum_top_ups"):
        assert isinstance(bill[field], Decimal), field
    assert bill["event_count"] >= 4
    assert bill["total_cost"] >= rows[heavy]["total_cost"] + rows[light]["total_cost"]
    assert all(isinstance(line["total_cost"], Decimal) for line in bill["by_service"])


def test_the_sync_client_has_the_same_queries(tally):
    provider = unique("sync").replace("-", "_")
    with SyncUsageTracker(api_key=tally.api_key, base_url=tally.ingest_url) as t:  # query_url derived
        assert t.query_url == tally.ingest_url, "no port 8000 to replace: the same URL"
        t.query_url = tally.query_url
        user = unique("syncuser")
        t.track_custom(user_id=user, service_type="custom", service_provider=provider, event_type="render",
                       metrics={"images": 4})  # fmt: skip
        t.flush()
        aggregate = t.get_aggregates(group_by="none", service_provider=provider)
        trends = t.get_trends(metric="custom:images", service_provider=provider)
        top = t.get_top_users(by="event_count", service_provider=provider)
        bill = t.get_billing_summary(month=datetime.now(timezone.utc).date())
    assert sum(row["event_count"] for row in aggregate["aggregations"]) == 1
    assert sum(point["value"] or 0 for point in trends["data_points"]) == 4
    assert [user["user_id"] for user in top["users"]] == [user]
    assert bill["month"] == datetime.now(timezone.utc).strftime("%Y-%m")
