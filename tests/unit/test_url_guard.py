"""The URL guard's address and port rules (routing/io/net.py), checked without connecting."""

from __future__ import annotations

import pytest

from routing.io.net import UrlError, UrlPolicy, check_url

PUBLIC = "93.184.215.14"


def policy(**kwargs: object) -> UrlPolicy:
    return UrlPolicy(resolver=lambda host, port: {"media.example": [PUBLIC]}[host], **kwargs)


@pytest.mark.parametrize("url", ["http://media.example/a.png", "https://media.example:443/a.png"])
def test_ports_80_and_443_are_allowed(url: str) -> None:
    assert check_url(url, policy()) == [PUBLIC]


@pytest.mark.parametrize("port", [22, 6379, 8080, 444])
def test_other_ports_on_public_hosts_are_refused(port: int) -> None:
    with pytest.raises(UrlError, match=f"port {port} is not allowed"):
        check_url(f"http://media.example:{port}/a.png", policy())


def test_a_port_the_setting_adds_is_allowed() -> None:
    assert check_url("https://media.example:8443/a", policy(allow_ports=(80, 443, 8443))) == [PUBLIC]
    with pytest.raises(UrlError, match="port 8444"):
        check_url("https://media.example:8444/a", policy(allow_ports=(80, 443, 8443)))


def test_allowed_networks_take_any_port() -> None:
    assert check_url("http://127.0.0.2:8123/", UrlPolicy(allow_cidrs=("127.0.0.2/32",))) == ["127.0.0.2"]


@pytest.mark.parametrize("address", ["fec0::1", "feff:ffff::1", "::ffff:10.0.0.1"])
def test_site_local_ipv6_is_refused(address: str) -> None:
    with pytest.raises(UrlError, match="site-local|private"):
        check_url(f"http://[{address}]/", UrlPolicy())


def test_the_settings_reach_the_policy() -> None:
    from producer.client import Client
    from routing.settings import Settings

    client = Client(Settings(url_allow_ports=[443, 8443]))
    assert client.url_policy.allow_ports == (443, 8443)
