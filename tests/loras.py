"""Helpers for the tests that run LoRA jobs on the small models in this process."""

from __future__ import annotations

from typing import Any

from routing.io.storage import Storage


def resolved(request: Any, storage: Storage, max_rank: int = 8) -> Any:
    """``request``, whose LoRAs are in ``storage``, resolved as the API does at submit (each
    named by its content-addressed key), for no tenant and with no fetch."""
    from producer.inputs import InputLimits, resolve_loras
    from producer.tenant_keys import KeyScope
    from routing.io.net import UrlPolicy

    return resolve_loras(
        request, storage, UrlPolicy(), InputLimits(lora_max_rank=max_rank), KeyScope("", lambda _: None)
    )


def calls(module: Any) -> list[int]:
    """A list that grows by one at each call of ``module``."""
    seen: list[int] = []
    module.register_forward_pre_hook(lambda *_: seen.append(1))
    return seen
