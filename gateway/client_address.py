"""Where a call came from: the connection's peer, or the client a trusted proxy names.

`X-Forwarded-For` is a header anyone can write, so it is read only on a
connection from one of `gateway.trusted_proxies` (a load balancer or
TLS-terminating proxy in front of the gateway). Otherwise the socket's peer is
the client, whatever the headers say. uvicorn's own proxy-header handling is
off (gateway/server.py): it trusts 127.0.0.1 by default, which let any local
process name itself any address in the audit trail, to policy's client
networks, and to the client-certificate header's proxy check.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse(addr: str | None) -> IPAddress | None:
    """An address, or None when there is none or it is not an IP address.

    An IPv4 address mapped into IPv6 (`::ffff:10.0.0.5`) is the IPv4 address
    it maps: a socket listening on `::` sees every IPv4 client that way, and
    the operator's networks (policy `clients`, trusted proxies) are IPv4.
    """
    try:
        ip = ipaddress.ip_address(addr or "")
    except ValueError:
        return None
    return (ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else ip


def canonical(addr: str) -> str:
    """A connection's peer address as the gateway records and matches it (see `parse`)."""
    ip = parse(addr)
    return addr if ip is None else str(ip)


class Networks:
    """IP networks (CIDR notation) that addresses are tested against."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        self._networks = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, addr: object) -> bool:
        ip = parse(addr) if isinstance(addr, str) else None
        return ip is not None and any(ip in n for n in self._networks)


def client_of(peer: str | None, forwarded_for: list[str], proxies: Networks) -> str | None:
    """The caller's address: `peer`, unless `peer` is a trusted proxy.

    Then `forwarded_for` (every `X-Forwarded-For` value, in order) is read from
    the right, where each proxy appended the address it saw: the first address
    that is not itself a trusted proxy is the client. A hop that is not an IP
    address ends the walk at the last trusted proxy before it.
    """
    if peer not in proxies:
        return peer
    client = peer
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
    for hop in reversed(hops):
        ip = parse(hop)
        if ip is None:
            break
        client = str(ip)
        if client not in proxies:
            break
    return client
