"""Step caching on the real Qwen-Image and Wan pipelines (small random weights): a cached job
computes fewer transformer blocks, says it was cached, and the next job without a cache runs
exactly as if no cache had ever been applied."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from routing.catalog import CATALOG
from routing.schemas import FirstBlockCache, TaylorSeerCache
from worker.adapters.base import Images, Runtime
from worker.adapters.qwen_image import QwenImageAdapter
from worker.adapters.wan import WanTI2VAdapter

CPU = Runtime(device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def qwen(small_models_dir: Path) -> QwenImageAdapter:
    return QwenImageAdapter(CATALOG["qwen-image"], str(small_models_dir / "qwen-image"), CPU)


@pytest.fixture(scope="module")
def ti2v(small_models_dir: Path) -> WanTI2VAdapter:
    return WanTI2VAdapter(CATALOG["wan2.2-ti2v-5b"], str(small_models_dir / "wan2.2-ti2v-5b"), CPU)


@contextmanager
def counting_blocks(transformer: Any) -> Iterator[list[int]]:
    """Count the transformer blocks that really compute: a forward hook on each block's first
    projection, which a skipped block (or a predicted attention) never calls. A hook on the
    block itself would count skipped blocks too: the cache replaces their forward, not the call."""
    count = [0]
    blocks = getattr(transformer, "transformer_blocks", None) or transformer.blocks
    handles = []
    for block in blocks:
        attention = getattr(block, "attn", None) or block.attn1
        handles.append(attention.to_q.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1)))
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()


def image_request(cache: Any = None) -> SimpleNamespace:
    return SimpleNamespace(
        prompt="a red fox",
        negative_prompt=None,
        width=64,
        height=48,
        steps=6,
        guidance_scale=4.0,
        seed=3,
        num_outputs=1,
        cache=cache,
    )


def video_request(cache: Any = None) -> SimpleNamespace:
    return SimpleNamespace(
        kind="text-to-video",
        prompt="a red fox",
        negative_prompt=None,
        width=64,
        height=64,
        frames=5,
        steps=6,
        guidance_scale=5.0,
        seed=3,
        cache=cache,
    )


def run(adapter: Any, request: SimpleNamespace) -> tuple[Any, int, np.ndarray]:
    transformer = adapter.pipeline.transformer
    with counting_blocks(transformer) as count:
        generated = adapter.run(request, {}, lambda done, total: None)
    pictures = generated.images if isinstance(generated, Images) else generated.frames
    return generated, count[0], np.stack([np.asarray(p) for p in pictures])


def test_first_block_cache_on_qwen_image_skips_blocks_and_is_removed_after(qwen):
    plain, plain_blocks, plain_pixels = run(qwen, image_request())
    # 6 steps x 2 passes (true CFG) x 2 blocks.
    assert (plain.cache, plain_blocks) == (None, 24)

    cached, cached_blocks, cached_pixels = run(
        qwen, image_request(FirstBlockCache(method="first_block", threshold=1.0))
    )
    assert cached.cache == "first_block"
    assert cached_blocks < plain_blocks
    assert cached_pixels.shape == plain_pixels.shape

    again, again_blocks, again_pixels = run(qwen, image_request())
    assert (again.cache, again_blocks) == (None, plain_blocks)
    assert np.array_equal(again_pixels, plain_pixels)


@pytest.mark.parametrize(
    "cache",
    [
        FirstBlockCache(method="first_block", threshold=0.2),
        TaylorSeerCache(method="taylorseer", interval=2, warmup_steps=1),
    ],
    ids=lambda cache: cache.method,
)
def test_caches_on_wan_compute_fewer_blocks_and_are_removed_after(ti2v, cache):
    plain, plain_blocks, plain_pixels = run(ti2v, video_request())
    assert (plain.cache, plain_blocks) == (None, 24)

    cached, cached_blocks, _ = run(ti2v, video_request(cache))
    assert cached.cache == cache.method
    assert cached_blocks < plain_blocks

    again, again_blocks, again_pixels = run(ti2v, video_request())
    assert again_blocks == plain_blocks
    assert np.array_equal(again_pixels, plain_pixels)


def test_taylorseer_on_qwen_image_predicts_blocks(qwen):
    _, plain_blocks, _ = run(qwen, image_request())
    cache = TaylorSeerCache(method="taylorseer", interval=2, warmup_steps=1)
    cached, cached_blocks, _ = run(qwen, image_request(cache))
    assert cached.cache == "taylorseer"
    assert cached_blocks < plain_blocks


def test_a_cached_job_on_compiled_blocks_runs_their_eager_code_and_compiles_nothing(
    small_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The cache hooks decide per step in Python whether a block runs: a full-graph compiled block
    cannot trace them (dynamo refuses the hook's ``torch.compiler.disable``d check), so before
    this the compiled profile failed every cached job. Dynamo traces with its eager backend here:
    the refusal is dynamo's, whatever compiles the graph after, and tracing takes seconds where
    inductor takes a minute."""
    from diffusers import ModelMixin

    from routing.classes import VramClass
    from routing.io.storage import LocalStorage
    from routing.schemas import parse_request
    from routing.settings import Settings
    from worker.speed import job_context, prepare

    compile_repeated_blocks = ModelMixin.compile_repeated_blocks
    monkeypatch.setattr(
        ModelMixin,
        "compile_repeated_blocks",
        lambda self, **kwargs: compile_repeated_blocks(self, **kwargs, backend="eager"),
    )
    spec = CATALOG["qwen-image"]
    adapter = QwenImageAdapter(spec, str(small_models_dir / spec.key), CPU)
    settings = Settings(
        compile_profile="compile", warm_sizes={spec.key: [(64, 64, 0)]}, lora_cache_dir=tmp_path / "cache"
    )
    speed = prepare(adapter, spec, VramClass.GPU80, settings)
    assert speed.compiled and speed.compiled_blocks
    storage = LocalStorage(tmp_path / "objects")
    data = {"model": spec.key, "prompt": "a red fox", "width": 64, "height": 64, "steps": 6, "seed": 3}

    def job(**extra: Any) -> tuple[np.ndarray, dict[str, float]]:
        request, timings = parse_request(data | extra), {}
        with job_context(adapter, request, storage, timings):
            image = adapter.run(request, {}, lambda done, total: None).images[0]
        return np.asarray(image), timings

    before, timings = job()
    assert timings["compile_regional"] == 1 and timings["compiled_graphs"] == 0
    for cache in ({"method": "first_block", "threshold": 1.0}, {"method": "taylorseer"}):
        cached, timings = job(cache=cache)
        assert timings["compile_regional"] == 0 and timings["compiled_graphs"] == 0
        assert not np.array_equal(cached, before)
    after, timings = job()
    assert timings["compile_regional"] == 1 and timings["compiled_graphs"] == 0
    assert np.array_equal(after, before)
