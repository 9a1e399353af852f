"""Where a call came from: X-Forwarded-For counts only from a trusted proxy.

The addresses in headers below are only text: no traffic goes anywhere but
the gateway on loopback.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from gateway.client_address import Networks, client_of
from gateway.settings import ConfigError, load_settings
from tests.conftest import GatewayFactory
from tests.support import EngineRef, SocketDouble

PROXIES = Networks(["127.0.0.1/32", "10.0.0.0/8"])


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "client"),
    [
        # Not from a proxy: the peer, whatever the header says.
        ("192.0.2.7", ["198.51.100.1"], "192.0.2.7"),
        # From a proxy: the address it appended.
        ("127.0.0.1", ["198.51.100.1"], "198.51.100.1"),
        # Read from the right: what the caller wrote first is not believed.
        ("127.0.0.1", ["203.0.113.66, 198.51.100.1"], "198.51.100.1"),
        # Through two trusted proxies, and over two header lines.
        ("127.0.0.1", ["203.0.113.66, 198.51.100.1", "10.1.2.3"], "198.51.100.1"),
        # Nothing forwarded, or only proxies: the last proxy.
        ("127.0.0.1", [], "127.0.0.1"),
        ("127.0.0.1", ["10.1.2.3"], "10.1.2.3"),
        # A hop that is not an address ends the walk at the proxy that sent it.
        ("127.0.0.1", ["198.51.100.1, not-an-ip"], "127.0.0.1"),
        ("127.0.0.1", ["198.51.100.1, not-an-ip, 10.1.2.3"], "10.1.2.3"),
        # IPv6, written back in its one canonical form.
        ("127.0.0.1", ["2001:DB8:0:0::1"], "2001:db8::1"),
        (None, ["198.51.100.1"], None),
        # IPv4 mapped into IPv6 (what a socket on `::` sees) is the IPv4 address.
        ("::ffff:127.0.0.1", ["::ffff:198.51.100.1"], "198.51.100.1"),
    ],
)
def test_the_client_is_the_first_untrusted_hop_from_the_right(
    peer: str | None, forwarded_for: list[str], client: str | None
) -> None:
    assert client_of(peer, forwarded_for, PROXIES) == client


def test_networks() -> None:
    assert "10.200.0.1" in PROXIES and "127.0.0.1" in PROXIES
    assert "127.0.0.2" not in PROXIES and "nonsense" not in PROXIES and None not in PROXIES
    assert not Networks([]) and PROXIES


@pytest.mark.parametrize("section", ["gateway", "auth.mtls"])
def test_a_trusted_proxy_network_must_be_cidr(tmp_path: Path, section: str) -> None:
    config = tmp_path / "bastion.toml"
    config.write_text(f'[{section}]\ntrusted_proxies = ["intranet"]\n')
    with pytest.raises(ConfigError, match=rf"{section}\.trusted_proxies: .*intranet"):
        load_settings(config)


def test_a_forged_forwarded_for_is_ignored_and_a_trusted_proxys_is_recorded(
    make_gateway: GatewayFactory, tripwire: SocketDouble
) -> None:
    engines = [EngineRef("m", tripwire.url, "k")]
    direct = make_gateway(engines=engines)
    proxied = make_gateway(engines=engines, gateway={"trusted_proxies": ["127.0.0.1/32"]})
    forged = {"x-forwarded-for": "198.51.100.1"}

    r = httpx.get(direct.url + "/v1/models", headers=forged)
    final = direct.final(r.headers["x-request-id"])
    assert r.status_code == 401 and final["client_addr"] == "127.0.0.1" and final["detail"] is None

    key = proxied.create_key()
    r = proxied.get("/v1/models", key=key, headers=forged)
    final = proxied.final(r.headers["x-request-id"])
    assert r.status_code == 200 and final["client_addr"] == "198.51.100.1"
    assert json.loads(final["detail"])["proxy"] == "127.0.0.1"  # the proxy that forwarded it
    r = proxied.get("/v1/models", key=key)
    final = proxied.final(r.headers["x-request-id"])
    assert final["client_addr"] == "127.0.0.1" and "proxy" not in json.loads(final["detail"] or "{}")


MAPPED_POLICY = """\
version: 1
teams:
  team-a:
    models: ['*']
    clients: ['127.0.0.0/8']
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_ipv4_clients_of_a_socket_on_all_ipv6_addresses_are_ipv4(make_gateway: GatewayFactory, workers: int) -> None:
    """A socket on `::` takes IPv4 too, however many workers share it (one
    worker's was asyncio's, IPv6 only: IPv4 clients were refused a connection),
    and sees each IPv4 client as `::ffff:a.b.c.d`. Every IPv4 network of the
    operator's (policy `clients`, trusted proxies) refused them all."""
    engine = SocketDouble("usage")
    try:
        gw = make_gateway(
            engines=[EngineRef("m", engine.url, "k")],
            gateway={"host": "::", "workers": workers, "trusted_proxies": ["127.0.0.1/32"]},
            policy=MAPPED_POLICY,
            policy_settings={"rate_limits": {"backend": "redis"}},
        )
        key = gw.create_key()
        r = gw.post(
            "/v1/chat/completions", key=key, json={"model": "m", "messages": [{"role": "user", "content": "x"}]}
        )
        assert r.status_code == 200, r.text
        assert gw.final(r.headers["x-request-id"])["client_addr"] == "127.0.0.1"
        # The trusted proxy is recognised too: its X-Forwarded-For is believed.
        r = gw.get("/v1/models", key=key, headers={"x-forwarded-for": "198.51.100.1"})
        assert gw.final(r.headers["x-request-id"])["client_addr"] == "198.51.100.1"
        assert httpx.get(f"http://[::1]:{gw.port}/healthz").status_code == 200
    finally:
        engine.close()
