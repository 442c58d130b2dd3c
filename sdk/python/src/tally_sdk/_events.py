"""Building events: the older SDK's nested shape (``metadata``/``metrics``), with an ``event_id`` and
a ``timestamp`` fixed when the event is made, so every resend of it is the same event to Tally.

Optional fields that are ``None`` are left out of the event rather than sent as ``null``.
"""

import copy
import uuid
from datetime import datetime, timezone
from typing import Any, Dict, List, Mapping, Optional

from .exceptions import ValidationError

Event = Dict[str, Any]


def new_event_id() -> str:
    """A random (version 4) UUID, as the older SDK made."""
    return str(uuid.uuid4())


def utc_timestamp(moment: Optional[datetime] = None) -> str:
    """RFC 3339 in UTC with microseconds, e.g. ``2024-01-15T10:30:00.123456Z``.

    A naive ``moment`` is taken as UTC (what ``datetime.utcnow()`` gives).
    """
    moment = moment or datetime.now(timezone.utc)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    text = moment.astimezone(timezone.utc).isoformat(timespec="microseconds")
    return text.replace("+00:00", "Z")


def _without_none(values: Mapping[str, Any]) -> Dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValidationError(message)


def _common(
    tenant_id: Optional[str],
    user_id: Optional[str],
    service_type: str,
    service_provider: Optional[str],
    event_type: Optional[str],
    session_id: Optional[str],
    request_id: Optional[str],
    tags: Optional[List[str]],
) -> Event:
    event: Event = {
        "event_id": new_event_id(),
        "timestamp": utc_timestamp(),
        "tenant_id": tenant_id,
        "user_id": user_id,
        "service_type": service_type,
        "service_provider": service_provider,
        "event_type": event_type,
        "tags": list(tags or []),
        "session_id": session_id,
        "request_id": request_id,
    }
    return _without_none(event)


def llm_event(
    tenant_id: Optional[str],
    user_id: Optional[str],
    model: Optional[str],
    input_tokens: Optional[int],
    output_tokens: Optional[int],
    latency_ms: Optional[float],
    temperature: Optional[float],
    max_tokens: Optional[int],
    model_version: Optional[str],
    service_provider: str,
    event_type: str,
    session_id: Optional[str],
    request_id: Optional[str],
    metadata: Optional[Dict[str, Any]],
    tags: Optional[List[str]],
) -> Event:
    """An ``llm_service`` event, checked as the older SDK checked it."""
    _require(bool(user_id), "user_id is required for LLM tracking")
    _require(bool(model), "model is required for LLM tracking")
    _require(input_tokens is not None and input_tokens >= 0, "input_tokens must be >= 0")
    _require(output_tokens is not None and output_tokens >= 0, "output_tokens must be >= 0")
    assert input_tokens is not None and output_tokens is not None
    event = _common(tenant_id, user_id, "llm_service", service_provider, event_type, session_id, request_id, tags)
    fixed = {"model": model, "model_version": model_version, "temperature": temperature, "max_tokens": max_tokens}
    event["metadata"] = _without_none({**fixed, **(metadata or {})})
    event["metrics"] = _without_none(
        {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
            "latency_ms": latency_ms,
        }
    )
    return event


def document_event(
    tenant_id: Optional[str],
    user_id: Optional[str],
    service_provider: Optional[str],
    document_type: Optional[str],
    processing_type: Optional[str],
    pages_processed: Optional[int],
    characters_extracted: Optional[int],
    processing_time_ms: Optional[float],
    file_size_bytes: Optional[int],
    file_format: Optional[str],
    event_type: str,
    session_id: Optional[str],
    request_id: Optional[str],
    metadata: Optional[Dict[str, Any]],
    tags: Optional[List[str]],
) -> Event:
    """A ``document_processor`` event, checked as the older SDK checked it."""
    _require(bool(user_id), "user_id is required for document tracking")
    _require(bool(service_provider), "service_provider is required for document tracking")
    _require(bool(document_type), "document_type is required for document tracking")
    _require(bool(processing_type), "processing_type is required for document tracking")
    _require(pages_processed is not None and pages_processed > 0, "pages_processed must be > 0")
    event = _common(
        tenant_id, user_id, "document_processor", service_provider, event_type, session_id, request_id, tags
    )
    fixed = {"document_type": document_type, "processing_type": processing_type, "file_format": file_format}
    event["metadata"] = _without_none({**fixed, **(metadata or {})})
    event["metrics"] = _without_none(
        {
            "pages_processed": pages_processed,
            "characters_extracted": characters_extracted,
            "processing_time_ms": processing_time_ms,
            "file_size_bytes": file_size_bytes,
        }
    )
    return event


def api_event(
    tenant_id: Optional[str],
    user_id: Optional[str],
    service_provider: Optional[str],
    endpoint: Optional[str],
    method: str,
    request_count: int,
    response_time_ms: Optional[float],
    payload_size_bytes: Optional[int],
    response_size_bytes: Optional[int],
    status_code: Optional[int],
    api_version: Optional[str],
    event_type: str,
    session_id: Optional[str],
    request_id: Optional[str],
    metadata: Optional[Dict[str, Any]],
    tags: Optional[List[str]],
) -> Event:
    """An ``api_service`` event, checked as the older SDK checked it."""
    _require(bool(user_id), "user_id is required for API tracking")
    _require(bool(service_provider), "service_provider is required for API tracking")
    _require(bool(endpoint), "endpoint is required for API tracking")
    event = _common(tenant_id, user_id, "api_service", service_provider, event_type, session_id, request_id, tags)
    fixed = {
        "endpoint": endpoint,
        "method": method.upper(),
        "api_version": api_version,
        "status_code": status_code,
    }
    event["metadata"] = _without_none({**fixed, **(metadata or {})})
    event["metrics"] = _without_none(
        {
            "request_count": request_count,
            "response_time_ms": response_time_ms,
            "payload_size_bytes": payload_size_bytes,
            "response_size_bytes": response_size_bytes,
        }
    )
    return event


def custom_event(
    tenant_id: Optional[str],
    user_id: Optional[str],
    service_type: Optional[str],
    service_provider: Optional[str],
    event_type: Optional[str],
    metrics: Optional[Dict[str, Any]],
    metadata: Optional[Dict[str, Any]],
    tags: Optional[List[str]],
    session_id: Optional[str],
    request_id: Optional[str],
) -> Event:
    """An event of any service type, with quantities under ``metrics``."""
    _require(bool(user_id), "user_id is required for custom tracking")
    _require(bool(service_type), "service_type is required for custom tracking")
    _require(bool(service_provider), "service_provider is required for custom tracking")
    _require(bool(event_type), "event_type is required for custom tracking")
    assert service_type is not None
    event = _common(tenant_id, user_id, service_type, service_provider, event_type, session_id, request_id, tags)
    event["metadata"] = _without_none(metadata or {})
    event["metrics"] = _without_none(metrics or {})
    return event


def raw_event(event: Mapping[str, Any], default_tenant_id: Optional[str]) -> Event:
    """A caller-built event (flat or nested), copied, with an ``event_id`` and ``timestamp`` added
    where missing. One that has them keeps them: resending it is safe."""
    if not isinstance(event, Mapping):
        raise ValidationError("an event must be a mapping of field names to values")
    copied: Event = copy.deepcopy(dict(event))
    _require(bool(copied.get("user_id")), "user_id is required")
    _require(bool(copied.get("service_type")), "service_type is required")
    if copied.get("event_id") is None:
        copied["event_id"] = new_event_id()
    else:
        copied["event_id"] = str(copied["event_id"])
    if copied.get("timestamp") is None:
        copied["timestamp"] = utc_timestamp()
    elif isinstance(copied["timestamp"], datetime):
        copied["timestamp"] = utc_timestamp(copied["timestamp"])
    if copied.get("tenant_id") is None and default_tenant_id is not None:
        copied["tenant_id"] = default_tenant_id
    for nested in ("metadata", "metrics"):
        if isinstance(copied.get(nested), dict):
            copied[nested] = _without_none(copied[nested])
    return _without_none(copied)
