"""How the h100x8 worker's pool serves a group model: ``GroupAdapter``, over the process's group.

The pool child serves the models in ``settings.group_models`` through ``GroupAdapter``. Every
instance shares the one group of the process (``resident_group``), which the first one starts;
the group loads every group model on every rank, so one torchrun serves them all. The group is
configured from ``routing.settings``: ``group_models``, ``group_world_size``, ``group_timeout_s``,
``group_start_timeout_s``, ``group_error_grace_s``, ``group_log_dir`` and ``max_run_s`` (a job's
deadline).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

from routing.catalog import ModelSpec, checkpoint_spec, get_model
from routing.io.storage import make_storage
from routing.settings import get_settings
from worker.adapters.base import Adapter, Capabilities, Generated, Inputs, Runtime, StepCallback
from worker.group.spec import SPEC_ENV
from worker.group.supervisor import Group
from worker.weights import local_weights

log = logging.getLogger(__name__)


class GroupAdapter(Adapter):
    """Adapter for a model served by the group; every instance shares the process's one group."""

    # The pipelines live in the ranks, out of this process's reach: base jobs only, not compiled
    # or warmed here.
    capabilities = Capabilities()

    def __init__(self, spec: ModelSpec, weights: str, runtime: Runtime):
        if os.environ.get(SPEC_ENV):
            raise RuntimeError("GroupAdapter inside a group rank: the group would start itself")
        super().__init__(spec, weights, runtime)
        self.weights = weights
        self.group = resident_group()
        if spec.key not in self.group.models:
            raise LookupError(f"{spec.key} is not one of the group's models ({', '.join(self.group.models)})")
        self.group.ensure_running()

    def run(self, request: Any, inputs: Inputs, on_step: StepCallback) -> Generated:
        return self.group.run(self.spec.key, request, inputs, on_step)

    def close(self) -> None:
        """Evicted from the worker's pool (a smaller class's model needs rank 0's GPU): end the
        group, which frees every rank's GPU; the next job of a group model starts a new one."""
        log.info("%s evicted: closing the group", self.spec.key)
        self.group.close()


_resident: Group | None = None
_resident_lock = threading.Lock()


def resident_group() -> Group:
    """The process's one group, configured from the settings: made by the first GroupAdapter,
    shared by every later one, and closed when the process exits."""
    global _resident
    with _resident_lock:
        if _resident is None:
            settings = get_settings()
            storage = make_storage(settings)
            _resident = Group(
                # The ranks read the node cache, filled here once for all of them, with each
                # model's official checkpoint (A14B's is not the diffusers one other classes read).
                models={
                    key: local_weights(settings, checkpoint_spec(get_model(key)), storage)
                    for key in settings.group_models
                },
                world_size=settings.group_world_size,
                device=settings.device,
                dtype=settings.dtype,
                timeout_s=settings.group_timeout_s,
                start_timeout_s=settings.group_start_timeout_s,
                job_timeout_s=float(settings.max_run_s),
                error_grace_s=settings.group_error_grace_s,
                log_dir=settings.group_log_dir,
            )
            atexit.register(_resident.close)
        return _resident
