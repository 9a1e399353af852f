"""Errors of the policy package, as types."""

from __future__ import annotations


class PolicyError(Exception):
    """A policy file that cannot be used: where it is wrong, and how.

    `str()` reads `policy.yaml:12: teams.risk.max_tokens: Expected int, got str`,
    so `bastion policy check`, the gateway's log and the audit record of a
    refused reload all name the file, the line and the field.
    """

    def __init__(self, source: str, message: str, *, line: int | None = None, field: str | None = None):
        self.source = source
        self.line = line
        self.field = field
        self.message = message
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {field}: {message}" if field else f"{where}: {message}")


class LimiterUnavailable(Exception):
    """The shared rate-limit store cannot be reached: calls are refused, not let through."""
