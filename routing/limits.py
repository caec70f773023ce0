"""The limits a request is validated under, as one value that travels with the job.

A request's limits come from two places. The catalog's (sizes, steps, frames, prompt length,
input images) are code: every process of a release has the same. The rest are the fleet's
settings (``FLEET_MAX_NUM_OUTPUTS``, ``FLEET_MAX_LORAS``), which may differ between the API and a
worker. ``parse_request`` reads only the ``RequestLimits`` it is given; the API validates under
its own settings' and stores them with the job, and the worker validates the stored request under
those, so a job the API accepted is never refused because a worker's environment is tighter.

The media caps (``producer.inputs.InputLimits``) are checked at submit only: the worker reads the
stored, already checked bytes and does not check them again, so they do not travel.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from routing.settings import Settings


@dataclass(frozen=True)
class RequestLimits:
    """The settings-decided limits of a request. The defaults are the settings' defaults."""

    # Most images one text-to-image job may make (its ``num_outputs``).
    max_num_outputs: int = 4
    # Most LoRAs one request may name.
    max_loras: int = 3

    @classmethod
    def from_settings(cls, settings: Settings) -> RequestLimits:
        return cls(max_num_outputs=settings.max_num_outputs, max_loras=settings.max_loras)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RequestLimits:
        """The limits ``to_json`` wrote. A limit added after the job was stored takes its
        default; one since removed is ignored. Raises ``ValueError`` for anything else."""
        data: Any = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"request limits must be a JSON object (got {text!r})")
        known = {f.name for f in fields(cls)}
        values = {name: value for name, value in data.items() if name in known}
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values.values()):
            raise ValueError(f"request limits must be whole numbers (got {text!r})")
        return cls(**values)


# The settings' defaults, for callers outside a fleet (tests, benchmarks, the warm-up jobs).
DEFAULT_LIMITS = RequestLimits()
