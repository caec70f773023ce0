"""Pipeline adapters, one per model family, imported only when a worker loads that model."""

from __future__ import annotations

import importlib

from routing.catalog import ModelSpec
from worker.adapters.base import Adapter, Runtime

GROUP_ADAPTER = "worker.group.adapter:GroupAdapter"

# model key -> "module:class" on a single GPU (or rank 0's of an h100x8 worker); a model
# without an entry is not served. Where a class shards the model (routing.memory Mode.SHARDED),
# the worker serves it through the torchrun group (GROUP_ADAPTER) instead.
ADAPTERS: dict[str, str] = {
    "z-image-turbo": "worker.adapters.z_image:ZImageAdapter",
    "z-image": "worker.adapters.z_image:ZImageAdapter",
    "z-image-omni-base": "worker.adapters.z_image:ZImageOmniAdapter",
    "qwen-image": "worker.adapters.qwen_image:QwenImageAdapter",
    "qwen-image-edit": "worker.adapters.qwen_image:QwenImageEditAdapter",
    "qwen-image-edit-2509": "worker.adapters.qwen_image:QwenImageEditPlusAdapter",
    "wan2.2-ti2v-5b": "worker.adapters.wan:WanTI2VAdapter",
    "wan2.2-t2v-a14b": "worker.adapters.wan:WanA14BAdapter",
    "wan2.2-i2v-a14b": "worker.adapters.wan:WanA14BAdapter",
    "wan2.2-animate-14b": "worker.adapters.wan:WanAnimateAdapter",
    # Runs in the h100x8 worker's resident torchrun group (worker/group/).
    "wan2.2-s2v-14b": GROUP_ADAPTER,
}


def load_adapter(
    spec: ModelSpec,
    weights: str,
    runtime: Runtime,
    overrides: dict[str, str] | None = None,
    sharded: bool = False,
) -> Adapter:
    """Load ``spec``'s adapter; ``overrides`` (settings.adapters) map model keys to adapters of
    one's own, over the built-in ones. ``sharded``: the worker's class shards the model, so the
    torchrun group serves it (unless ``overrides`` names another adapter)."""
    try:
        target = (overrides or {}).get(spec.key) or (GROUP_ADAPTER if sharded else ADAPTERS[spec.key])
    except KeyError:
        raise LookupError(f"no adapter runs {spec.key}") from None
    _quiet_loading()
    module_name, class_name = target.split(":")
    adapter_class = getattr(importlib.import_module(module_name), class_name)
    return adapter_class(spec, weights, runtime)


def _quiet_loading() -> None:
    """Loading bars belong on a terminal, not in a worker's log."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
