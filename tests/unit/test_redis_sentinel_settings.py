"""The Sentinel settings: how they are read, what they refuse, and the broker URL and transport
options Celery, Kombu and Flower get from them (the failover itself runs for real in
tests/faults/test_redis_failover.py)."""

from __future__ import annotations

import ssl

import kombu
import pytest
from pydantic import ValidationError

from routing.celery_config import celery_settings
from routing.io.connection import _data_node, _sentinel_options, broker_url, sentinel_addresses
from routing.settings import Settings


def test_sentinels_are_read_comma_separated_as_keda_reads_them_or_as_json(monkeypatch) -> None:
    monkeypatch.setenv("FLEET_REDIS_SENTINELS", "sentinel-0:26379, sentinel-1:26379,sentinel-2:26380")
    assert Settings().redis_sentinels == ["sentinel-0:26379", "sentinel-1:26379", "sentinel-2:26380"]
    monkeypatch.setenv("FLEET_REDIS_SENTINELS", '["sentinel-0:26379"]')
    assert Settings().redis_sentinels == ["sentinel-0:26379"]
    monkeypatch.setenv("FLEET_REDIS_SENTINELS", "")
    assert Settings().redis_sentinels == []


@pytest.mark.parametrize(
    "address", ["sentinel-0", "sentinel-0:", ":26379", "sentinel-0:0", "sentinel-0:65536", "s:x"]
)
def test_a_sentinel_that_is_not_host_and_port_is_refused(address: str) -> None:
    with pytest.raises(ValidationError, match="host:port"):
        Settings(redis_sentinels=[address])


def test_the_highest_port_and_an_ipv6_sentinel_are_taken() -> None:
    settings = Settings(redis_sentinels=["sentinel-0:65535", "[::1]:26379"])
    assert sentinel_addresses(settings) == [("sentinel-0", 65535), ("::1", 26379)]


def test_a_socket_through_sentinel_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"must be redis\[s\]://"):
        Settings(redis_url="unix:///run/redis.sock", redis_sentinels=["sentinel-0:26379"])


def test_through_sentinel_a_rediss_url_puts_the_sentinels_the_data_nodes_and_the_broker_on_tls() -> None:
    settings = Settings(
        redis_url="rediss://:secret@unused/2?ssl_cert_reqs=required&ssl_ca_certs=/etc/fleet/ca.pem",
        redis_sentinels=["sentinel-0:26379"],
    )
    tls = {"ssl_cert_reqs": "required", "ssl_ca_certs": "/etc/fleet/ca.pem"}
    assert _data_node(settings) == {"db": 2, "password": "secret", **tls}
    assert {"ssl": True, **tls}.items() <= _sentinel_options(settings).items()
    config = celery_settings(settings)
    assert config["broker_transport_options"]["sentinel_kwargs"]["ssl_ca_certs"] == "/etc/fleet/ca.pem"
    assert config["broker_use_ssl"] == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": "/etc/fleet/ca.pem",
    }


def test_the_broker_names_every_sentinel_with_the_data_nodes_password_and_database() -> None:
    settings = Settings(
        redis_url="redis://:p%40ss%3Aw%2Frd@unused/3",  # p@ss:w/rd
        redis_sentinels=["sentinel-0:26379", "sentinel-1:26380"],
        redis_sentinel_master="jobs",
        redis_sentinel_password="sentinel-secret",
    )
    url = broker_url(settings)
    assert url.count("sentinel://") == 2 and "unused" not in url
    connection = kombu.Connection(url)
    # Kombu reads each Sentinel's URL back to the same password and database.
    assert connection.transport_cls == "sentinel"
    assert [alternate.split("@")[1] for alternate in connection.alt] == [
        "sentinel-0:26379/3",
        "sentinel-1:26380/3",
    ]
    assert connection.password == "p@ss:w/rd" and connection.virtual_host == "3"
    options = celery_settings(settings)["broker_transport_options"]
    assert options["master_name"] == "jobs"
    assert options["sentinel_kwargs"]["password"] == "sentinel-secret"
    assert options["visibility_timeout"] == settings.visibility_timeout_s


def test_without_sentinels_the_broker_is_the_one_redis() -> None:
    settings = Settings(redis_url="redis://:secret@redis:6379/2")
    assert broker_url(settings) == "redis://:secret@redis:6379/2"
    assert "master_name" not in celery_settings(settings)["broker_transport_options"]


def test_a_rediss_url_has_every_process_check_the_server_unless_it_says_not_to() -> None:
    def broker_tls(url: str) -> object:
        return celery_settings(Settings(redis_url=url))["broker_use_ssl"]

    # Kombu alone would take rediss://host/0 as "no check"; redis-py checks: the fleet checks.
    assert broker_tls("rediss://redis:6380/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert broker_tls("rediss://redis:6380/0?ssl_cert_reqs=none") == {"ssl_cert_reqs": ssl.CERT_NONE}
    assert broker_tls("redis://redis:6379/0") is False
    through_sentinel = Settings(redis_url="rediss://redis:6380/0", redis_sentinels=["sentinel-0:26379"])
    assert _sentinel_options(through_sentinel)["ssl_cert_reqs"] == "required"
