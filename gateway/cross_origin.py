"""Requests a browser made for a page of another site (cross-site request forgery).

A browser attaches its user's client certificate (a smart card, a PIV badge)
to every request to the gateway, whichever page made it. A page on any site
could have an employee's browser call the model, or re-verify every model,
as that employee: a form posting `text/plain` needs no CORS preflight. The
gateway serves no browser page and sends no CORS headers (a page of another
site could never read an answer), so it refuses every such state-changing
request, by the rule of Go's `net/http.CrossOriginProtection`: by
`Sec-Fetch-Site`, which browsers have sent since 2023, else by `Origin`
against `Host`. The SDKs and curl send neither header and are not affected.

The admin and auditor routes refuse such reads too: what an auditor reads or
runs there (a verification of the whole trail, an export) is recorded under
their name, and a page of another site must not make one with an `<img>`.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

# Methods that change nothing, by HTTP's definition; browsers send them across
# sites freely (links, images), and so does the rule this module follows.
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def cross_site(method: str, headers: Mapping[str, str], *, reads_too: bool = False) -> bool:
    """Whether a browser sent this state-changing request (or, with
    `reads_too`, any request) for a page of another origin."""
    if method in _SAFE_METHODS and not reads_too:
        return False
    site = headers.get("sec-fetch-site")
    if site is not None:
        # "none": the user's own doing (the address bar, a bookmark).
        return site not in ("same-origin", "none")
    origin = headers.get("origin")
    if origin is None:
        return False  # not a browser, or one too old to say
    host = headers.get("host")
    # `Origin: null` (a sandboxed page, a redirect across sites) has no host.
    return host is None or urlsplit(origin).netloc.lower() != host.lower()
