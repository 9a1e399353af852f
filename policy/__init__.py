"""Policy: who may call which model with what (issue 4).

Free of HTTP and SQL by design: the gateway turns a request into `Caller` and
`Prompt`, asks `decide()`, and enforces the `Decision`. Rate-limit state sits
behind `RateLimiter` (in memory, or Redis shared by replicas).
"""

from policy.decide import Bucket, Caller, Decision, Denial, Fired, MediaPart, Prompt, decide
from policy.errors import LimiterUnavailable, PolicyError
from policy.limits import Admission, Lease, MemoryLimiter, RateLimiter
from policy.load import Policy, load_policy, parse_policy

__all__ = [
    "Admission",
    "Bucket",
    "Caller",
    "Decision",
    "Denial",
    "Fired",
    "LimiterUnavailable",
    "Lease",
    "MediaPart",
    "MemoryLimiter",
    "Policy",
    "PolicyError",
    "Prompt",
    "RateLimiter",
    "decide",
    "load_policy",
    "parse_policy",
]
