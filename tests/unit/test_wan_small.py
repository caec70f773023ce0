"""The Wan adapters on small random-weight Wan2.2 TI2V-5B and Animate-14B models.

Random weights make small effects, so "the input conditions the output" is checked as a share of
pixels that change, never as a likeness.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from routing.catalog import get_model
from testkit import small_models
from worker.adapters import wan
from worker.adapters.base import JobCanceled, Runtime

TI2V = "wan2.2-ti2v-5b"
ANIMATE = "wan2.2-animate-14b"
CPU = Runtime(device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small-wan")
    small_models.build(out, [TI2V, ANIMATE])
    return out


@pytest.fixture(scope="module")
def ti2v(built: Path) -> wan.WanTI2VAdapter:
    return wan.WanTI2VAdapter(get_model(TI2V), str(built / TI2V), CPU)


@pytest.fixture(scope="module")
def animate(built: Path) -> wan.WanAnimateAdapter:
    return wan.WanAnimateAdapter(get_model(ANIMATE), str(built / ANIMATE), CPU)


class Steps:
    """An ``on_step`` that records its calls, and cancels at ``cancel_at`` if given."""

    def __init__(self, cancel_at: int | None = None):
        self.seen: list[tuple[int, int]] = []
        self.cancel_at = cancel_at

    def __call__(self, done: int, total: int) -> None:
        self.seen.append((done, total))
        if done == self.cancel_at:
            raise JobCanceled


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _video(frames: int, size: tuple[int, int], seed: int) -> list[Image.Image]:
    return [_noise(size, seed * 1000 + i) for i in range(frames)]


def _pixels(frames: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(f) for f in frames]).astype(int)


def _changed(a: list[Image.Image], b: list[Image.Image]) -> float:
    return float((_pixels(a) != _pixels(b)).mean())


def _check_video(frames: list[Image.Image], count: int, size: tuple[int, int]) -> None:
    assert len(frames) == count
    assert all(f.size == size and f.mode == "RGB" for f in frames)
    pixels = _pixels(frames)
    assert pixels.min() != pixels.max()


def _video_request(**overrides: Any) -> SimpleNamespace:
    fields = dict(
        kind="text-to-video",
        prompt="a red fox in the snow",
        negative_prompt=None,
        width=96,
        height=64,
        frames=9,
        steps=2,
        guidance_scale=5.0,
        seed=7,
        cache=None,
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


def _animate_request(**overrides: Any) -> SimpleNamespace:
    fields = dict(
        kind="animate",
        mode="move",
        video=None,
        prompt="a person dancing",
        negative_prompt=None,
        width=64,
        height=48,
        frames=9,
        steps=2,
        guidance_scale=1.0,
        seed=7,
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


def _driving(frames: int = 12, seed: int = 1, mix: bool = False, size=(64, 48)) -> dict[str, Any]:
    inputs: dict[str, Any] = {
        "image": _noise((40, 56), seed),
        "pose_video": _video(frames, size, seed + 1),
        # Not the motion encoder's size: the adapter fits the face crops to it.
        "face_video": _video(frames, (24, 24), seed + 2),
    }
    if mix:
        inputs["background_video"] = _video(frames, size, seed + 3)
        mask = Image.new("RGB", size, (0, 0, 0))
        mask.paste((255, 255, 255), (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
        inputs["mask_video"] = [mask] * frames
    return inputs


# --- layout -------------------------------------------------------------------------------------


def test_ti2v_is_a_wan_repo_that_both_pipelines_load(built: Path) -> None:
    from diffusers import WanImageToVideoPipeline
    from transformers import AutoTokenizer, T5Tokenizer

    model = built / TI2V
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["expand_timesteps"] is True
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
    vae = json.loads((model / "vae" / "config.json").read_text())
    # The Wan2.2 VAE's keys that decide what the pipelines accept.
    assert (vae["z_dim"], vae["is_residual"], vae["patch_size"]) == (48, True, 2)
    assert (vae["scale_factor_spatial"], vae["scale_factor_temporal"]) == (16, 4)
    scheduler = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "flow_prediction" and scheduler["use_flow_sigmas"]

    i2v = WanImageToVideoPipeline.from_pretrained(model)
    assert i2v.config.expand_timesteps and i2v.image_encoder is None

    tok = AutoTokenizer.from_pretrained(model / "tokenizer")
    assert isinstance(tok, T5Tokenizer)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("a red fox").input_ids
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    text_encoder = json.loads((model / "text_encoder" / "config.json").read_text())
    assert text_encoder["vocab_size"] >= len(tok)


def test_animate_is_a_wan_animate_repo(built: Path) -> None:
    model = built / ANIMATE
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "WanAnimatePipeline"
    assert index["image_encoder"] == ["transformers", "CLIPVisionModel"]
    assert index["image_processor"] == ["transformers", "CLIPImageProcessor"]
    for sub in (
        "transformer",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
        "image_encoder",
        "image_processor",
    ):
        assert (model / sub).is_dir(), sub


# --- TI2V ---------------------------------------------------------------------------------------


def test_text_to_video(ti2v: wan.WanTI2VAdapter) -> None:
    steps = Steps()
    out = ti2v.run(_video_request(), {}, steps)
    _check_video(out.frames, 9, (96, 64))
    assert out.fps == get_model(TI2V).video.fps == 24 and out.seed == 7
    assert steps.seen == [(1, 2), (2, 2)]

    again = ti2v.run(_video_request(), {}, Steps())
    assert _changed(out.frames, again.frames) == 0
    other = ti2v.run(_video_request(prompt="a blue car on a mountain road"), {}, Steps())
    assert _changed(out.frames, other.frames) > 0.2


def test_image_to_video_follows_the_image(ti2v: wan.WanTI2VAdapter) -> None:
    request = _video_request(kind="image-to-video", frames=5)
    steps = Steps()
    # Another aspect ratio than the video's: the adapter crops rather than stretches.
    first = ti2v.run(request, {"image": _noise((120, 64), 1)}, steps)
    _check_video(first.frames, 5, (96, 64))
    assert steps.seen == [(1, 2), (2, 2)]
    second = ti2v.run(request, {"image": _noise((120, 64), 2)}, Steps())
    assert _changed(first.frames, second.frames) > 0.3
    # i2v shares the t2v pipeline's modules: one copy of the weights.
    assert ti2v.i2v.transformer is ti2v.t2v.transformer and ti2v.i2v.vae is ti2v.t2v.vae


def test_ti2v_checks_inputs_first(ti2v: wan.WanTI2VAdapter) -> None:
    steps = Steps()
    with pytest.raises(ValueError, match="multiples of 32"):
        ti2v.run(_video_request(width=80), {}, steps)
    with pytest.raises(ValueError, match="4k\\+1"):
        ti2v.run(_video_request(frames=8), {}, steps)
    with pytest.raises(ValueError, match="input image"):
        ti2v.run(_video_request(kind="image-to-video"), {}, steps)
    assert steps.seen == []


def test_ti2v_cancel_stops_the_call(ti2v: wan.WanTI2VAdapter) -> None:
    steps = Steps(cancel_at=1)
    with pytest.raises(JobCanceled):
        ti2v.run(_video_request(steps=3), {}, steps)
    assert steps.seen == [(1, 3)]


# --- Animate ------------------------------------------------------------------------------------


def test_animate_move(animate: wan.WanAnimateAdapter) -> None:
    steps = Steps()
    # Driving videos longer than asked for: the output has the frames asked for.
    out = animate.run(_animate_request(), _driving(frames=12), steps)
    _check_video(out.frames, 9, (64, 48))
    assert out.fps == get_model(ANIMATE).video.fps == 30 and out.seed == 7
    assert steps.seen == [(1, 2), (2, 2)]

    other_pose = animate.run(
        _animate_request(), {**_driving(), "pose_video": _video(12, (64, 48), 9)}, Steps()
    )
    assert _changed(out.frames, other_pose.frames) > 0.05


def test_animate_from_a_video_too_short_for_the_frames_asked_names_the_video(
    animate: wan.WanAnimateAdapter,
) -> None:
    request = _animate_request(video=SimpleNamespace(key="uploads/_/dance.mp4"), frames=13)
    with pytest.raises(ValueError, match="the video has 12 frames at 30 fps, fewer than the 13 asked for"):
        animate.run(request, _driving(frames=12), Steps())


def test_animate_mix_uses_its_background(animate: wan.WanAnimateAdapter) -> None:
    request = _animate_request(mode="mix")
    inputs = _driving(mix=True)
    mixed = animate.run(request, inputs, Steps())
    _check_video(mixed.frames, 9, (64, 48))
    moved = animate.run(_animate_request(), inputs, Steps())
    assert _changed(mixed.frames, moved.frames) > 0.05
    other = animate.run(request, {**inputs, "background_video": _video(12, (64, 48), 50)}, Steps())
    assert _changed(mixed.frames, other.frames) > 0.05


def test_animate_long_clip_runs_in_segments(animate: wan.WanAnimateAdapter, monkeypatch) -> None:
    # 5-frame segments continuing from 1 frame: 9 frames take two, and progress spans both.
    monkeypatch.setattr(wan, "ANIMATE_SEGMENT_FRAMES", 5)
    steps = Steps()
    out = animate.run(_animate_request(), _driving(), steps)
    _check_video(out.frames, 9, (64, 48))
    assert steps.seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_animate_checks_inputs_first(animate: wan.WanAnimateAdapter) -> None:
    steps = Steps()
    with pytest.raises(ValueError, match="mix needs background_video, mask_video"):
        animate.run(_animate_request(mode="mix"), _driving(), steps)
    with pytest.raises(ValueError, match="face_video has 6 frames, fewer than the 9"):
        animate.run(_animate_request(), {**_driving(), "face_video": _video(6, (24, 24), 3)}, steps)
    with pytest.raises(ValueError, match="multiples of 16"):
        animate.run(_animate_request(width=72), _driving(), steps)
    with pytest.raises(ValueError, match="unknown animate mode"):
        animate.run(_animate_request(mode="swap"), _driving(), steps)
    assert steps.seen == []


def test_animate_cancel_stops_the_call(animate: wan.WanAnimateAdapter) -> None:
    steps = Steps(cancel_at=1)
    with pytest.raises(JobCanceled):
        animate.run(_animate_request(), _driving(), steps)
    assert steps.seen == [(1, 2)]


def test_nan_is_an_error_not_a_black_video() -> None:
    video = np.zeros((2, 8, 8, 3), dtype=np.float32)
    video[1, 3, 3, 0] = np.nan
    with pytest.raises(RuntimeError, match="NaN"):
        wan._to_pil_frames(video)
