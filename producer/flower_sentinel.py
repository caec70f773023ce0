"""Flower's queue lengths through every Sentinel (``producer.flower`` applies it as Flower loads
the fleet's app). Flower ships with the api extra: this module is the API's, not the SDK's."""

from __future__ import annotations

from typing import Any

from flower.utils import broker

from routing.io.connection import connect_async
from routing.settings import Settings


def read_queues_through_every_sentinel(settings: Settings) -> None:
    """Flower reads queue lengths with a Redis client of its own (``flower.utils.broker``), and
    on a ``sentinel://`` broker its client asks only the Sentinel the URL names first: with that
    one down, its queue pages fail while the others name a serving master. Its Sentinel broker is
    given the fleet's own asyncio client instead (``routing.io.connection.connect_async``): every
    Sentinel of ``FLEET_REDIS_SENTINELS``, the same TLS options, the same master discovery as every
    fleet process. A no-op without Sentinels."""
    if not settings.redis_sentinels:
        return

    class FleetSentinel(broker.RedisSentinel):
        def _get_redis_client(self, broker_options: Any, broker_use_ssl: Any) -> Any:
            # One per request, closed after it by Flower (``queues``): two connections at most.
            return connect_async(
                settings, max_connections=2, timeout_s=5, socket_timeout_s=self.socket_timeout
            )

    broker.RedisSentinel = FleetSentinel  # Flower's Broker picks its class by this name, per request
