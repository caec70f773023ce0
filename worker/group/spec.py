"""What the supervisor tells every rank when it starts the group, and where each rank runs.

The supervisor passes ``GroupSpec`` as JSON in ``FLEET_GROUP_SPEC`` and the connection's
authentication key (hex) in ``FLEET_GROUP_AUTHKEY``; a group model is built with its rank's
``GroupPlace``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

SPEC_ENV = "FLEET_GROUP_SPEC"
AUTHKEY_ENV = "FLEET_GROUP_AUTHKEY"


@dataclass(frozen=True)
class GroupSpec:
    address: tuple[str, int]  # the supervisor's listener
    models: dict[str, str]  # model key -> weights (path or hub id)
    device: str = "auto"
    dtype: str = "auto"
    timeout_s: float = 900.0  # every collective
    heartbeat_s: float = 10.0
    reply_timeout_s: float = 300.0  # rank 0 waiting for the supervisor's answer to a step
    consumer_pid: int | None = None

    @classmethod
    def from_env(cls) -> GroupSpec:
        data = json.loads(os.environ[SPEC_ENV])
        data["address"] = tuple(data["address"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.__dict__ | {"address": list(self.address)})


@dataclass(frozen=True)
class GroupPlace:
    """Where a group model runs: this rank, the group's size, this rank's GPU."""

    rank: int
    world_size: int
    local_rank: int
