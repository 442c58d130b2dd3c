"""What the SDK returns.

Query answers are plain ``dict``s described by ``TypedDict``s: a field Tally adds later is kept (and
simply not described), and ``result["total_count"]`` works as it did with the older SDK. Numbers
with a fraction are :class:`decimal.Decimal` (never ``float``), and money is a ``Decimal`` whether
Tally wrote it as a JSON string or a JSON number.

Results of sending events are dataclasses made by the SDK.
"""

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Dict, List, Optional, TypedDict, Union

Number = Union[int, Decimal]


@dataclass
class FailedEvent:
    """An event Tally will never store as sent: retrying it cannot help.

    ``status_code`` is the HTTP status of the answer that refused it (400 for an event a batch
    rejected; 401, 403 or 413 when the whole request was refused).
    """

    event_id: Optional[str]
    error: str
    event: Dict[str, Any]
    status_code: int
    code: Optional[str] = None
    index: Optional[int] = None


@dataclass
class FlushResult:
    """What one flush did with the buffered events."""

    sent: int = 0
    stored: int = 0
    duplicates: int = 0
    accepted: int = 0
    rejected: List[FailedEvent] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when Tally took every event sent (stored now, or stored before)."""
        return not self.rejected

    def add(self, other: "FlushResult") -> None:
        self.sent += other.sent
        self.stored += other.stored
        self.duplicates += other.duplicates
        self.accepted += other.accepted
        self.rejected.extend(other.rejected)


class BillingInfo(TypedDict, total=False):
    total_cost: Optional[Decimal]
    priced: bool


class UsageEvent(TypedDict, total=False):
    """One event of a usage listing."""

    event_id: str
    timestamp: str
    user_id: str
    service_type: str
    service_provider: str
    event_type: str
    model: Optional[str]
    status: str
    error_code: Optional[str]
    metrics: Dict[str, Any]
    billing_info: Optional[BillingInfo]
    total_cost: Optional[Decimal]
    tags: List[str]
    metadata: Dict[str, Any]
    session_id: Optional[str]
    request_id: Optional[str]


class UsageList(TypedDict, total=False):
    """``GET /api/v1/usage``: events newest first, and where the next page starts."""

    events: List[UsageEvent]
    total_count: int
    limit: int
    offset: int
    has_more: bool
    next_cursor: Optional[str]
    start_date: str
    end_date: str


class AggregateRow(TypedDict, total=False):
    """One period (and group) of ``GET /api/v1/usage/aggregate``."""

    period_start: Optional[str]
    period_end: Optional[str]
    service_type: Optional[str]
    service_provider: Optional[str]
    user_id: Optional[str]
    model: Optional[str]
    event_type: Optional[str]
    event_count: int
    error_count: int
    error_rate: Number
    unique_users: int
    total_cost: Decimal
    unpriced_event_count: int
    aggregated_metrics: Dict[str, Number]
    latency_count: int
    latency_avg_ms: Optional[Number]
    latency_max_ms: Optional[Number]
    latency_p50_ms: Optional[Number]
    latency_p95_ms: Optional[Number]
    latency_p99_ms: Optional[Number]


class AggregateResult(TypedDict, total=False):
    """``GET /api/v1/usage/aggregate``. The rows are under both ``aggregations`` (Tally's name) and
    ``aggregates`` (the older system's), whichever the server sent."""

    period: str
    group_by: List[str]
    start_date: str
    end_date: str
    time_zone: str
    aggregations: List[AggregateRow]
    aggregates: List[AggregateRow]
    total_aggregates: Dict[str, Any]


class TrendPoint(TypedDict, total=False):
    period: str
    period_end: str
    value: Optional[Number]


class Trends(TypedDict, total=False):
    """``GET /api/v1/analytics/trends``. ``trend``/``trend_direction`` ("up", "down", "stable") and
    ``period``/``period_type`` are both filled, whichever names the server used."""

    metric: str
    period: str
    period_type: str
    start_date: str
    end_date: str
    time_zone: str
    service_type: Optional[str]
    data_points: List[TrendPoint]
    trend: str
    trend_direction: str
    percentage_change: Optional[Number]


class TopUser(TypedDict, total=False):
    rank: int
    user_id: str
    value: Number
    share: Number
    event_count: int
    total_cost: Decimal
    unpriced_event_count: int


class TopUsers(TypedDict, total=False):
    """``GET /api/v1/analytics/top-users``."""

    by: str
    start_date: str
    end_date: str
    time_zone: str
    total_users: int
    users: List[TopUser]


class BillingServiceLine(TypedDict, total=False):
    service_type: str
    service_provider: str
    model: str
    event_count: int
    unpriced_event_count: int
    usage_cost: Decimal
    period_charges: Decimal
    total_cost: Decimal


class BillingRuleLine(TypedDict, total=False):
    rule_id: str
    source: str
    service_type: str
    service_provider: Optional[str]
    model: Optional[str]
    event_type: Optional[str]
    unit: str
    method: str
    units: Number
    usage_cost: Decimal
    tiered_charge: Decimal
    minimum_charge: Optional[Decimal]
    minimum_top_up: Decimal
    total_cost: Decimal


class BillingProjection(TypedDict, total=False):
    method: str
    elapsed_fraction: Number
    event_count: int
    usage_cost: Decimal
    tiered_charges: Decimal
    minimum_top_ups: Decimal
    total_cost: Decimal


class BillingSummary(TypedDict, total=False):
    """``GET /api/v1/billing/summary``: a month's bill."""

    tenant_id: str
    month: str
    time_zone: str
    period_start: str
    period_end: str
    as_of: str
    complete: bool
    event_count: int
    unpriced_event_count: int
    usage_cost: Decimal
    tiered_charges: Decimal
    minimum_top_ups: Decimal
    total_cost: Decimal
    by_service: List[BillingServiceLine]
    shared_period_charges: Decimal
    rules: List[BillingRuleLine]
    unattributed_cost: Decimal
    projection: Optional[BillingProjection]
