"""Times as the gateway stores and compares them: aware, in UTC.

SQLite keeps no zone: a time bound as 10:00+05:00 would be stored, and compared
as text, as if its clock read 10:00 UTC. So every time an operator or auditor
gives is converted to UTC before it reaches a query; a naive one is taken as UTC
already, which is also how SQLite hands stored times back.
"""

from __future__ import annotations

from datetime import UTC, datetime


def as_utc(value: datetime) -> datetime:
    """`value` in UTC. Raises OverflowError for a time outside year 1..9999 once
    in UTC (0001-01-01T00:00+05:00); each caller says so in its own words."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def parse_utc(text: str) -> datetime:
    """An ISO 8601 date or time, in UTC. Raises ValueError for text that is not
    one, OverflowError as `as_utc` does."""
    return as_utc(datetime.fromisoformat(text))
