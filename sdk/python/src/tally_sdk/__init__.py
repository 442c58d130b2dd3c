"""Python client for Tally, the usage-metering service.

``UsageTracker`` (async) keeps the older usage-tracking SDK's methods, arguments and defaults, so
switching is an import change::

    from tally_sdk import UsageTracker          # was: from client_sdk import UsageTracker

``SyncUsageTracker`` has the same methods for code without an event loop.
"""

from ._base import __version__
from ._buffer import WhenFull
from .exceptions import (
    AuthenticationError,
    BufferFullError,
    ConfigurationError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    RetryableError,
    ServiceUnavailableError,
    UsageTrackingError,
    ValidationError,
)
from .models import (
    AggregateResult,
    AggregateRow,
    BillingSummary,
    FailedEvent,
    FlushResult,
    TopUser,
    TopUsers,
    TrendPoint,
    Trends,
    UsageEvent,
    UsageList,
)
from .sync import SyncUsageTracker
from .tracker import UsageTracker

__all__ = [
    "AggregateResult",
    "AggregateRow",
    "AuthenticationError",
    "BillingSummary",
    "BufferFullError",
    "ConfigurationError",
    "FailedEvent",
    "FlushResult",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "RetryableError",
    "ServiceUnavailableError",
    "SyncUsageTracker",
    "TopUser",
    "TopUsers",
    "TrendPoint",
    "Trends",
    "UsageEvent",
    "UsageList",
    "UsageTracker",
    "UsageTrackingError",
    "ValidationError",
    "WhenFull",
    "__version__",
]
