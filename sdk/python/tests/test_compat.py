"""The older README's SDK example, with only the import changed (and the tenant set to the key's)."""

from datetime import datetime, timedelta

from support import run, unique
from tally_sdk import UsageTracker  # was: from client_sdk import UsageTracker


def test_the_older_readme_example_runs_unchanged(tally):
    user = unique("user")
    today = datetime.utcnow()

    async def track_usage():
        async with UsageTracker(
            tally.api_key,  # positional, in the older SDK's order
            tally.ingest_url,
            "demo",  # the key's tenant: any other tenant_id is refused with 403
        ) as tracker:
            # Track LLM usage
            await tracker.track_llm(
                user_id=user,
                model="gpt-4",
                input_tokens=100,
                output_tokens=50,
                service_provider="openai",
                metadata={"temperature": 0.7, "session_id": "chat-session-456"},
            )

            # Track document processing
            await tracker.track_document(
                user_id=user,
                service_provider="document_ai",
                document_type="invoice",
                processing_type="data_extraction",
                pages_processed=5,
                metadata={"accuracy": 0.98},
            )
            await tracker.flush_events()

            # Query usage data
            usage = await tracker.get_usage(
                start_date=today - timedelta(days=1),
                end_date=today + timedelta(days=1),
                service_type="llm_service",
                user_id=user,
            )
            return usage

    usage = run(track_usage())
    assert usage["total_count"] == 1
    [event] = usage["events"]
    assert (event["service_type"], event["model"], event["user_id"]) == ("llm_service", "gpt-4", user)
    assert event["metadata"]["session_id"] == "chat-session-456"
    # Numbers in metadata come back as strings on current builds and as numbers on newer ones.
    assert str(event["metadata"]["temperature"]) == "0.7"
