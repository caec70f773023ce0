"""The Qwen-Image adapters run the real diffusers pipelines on small random-weight builds.

With random weights the Edit pipelines attend almost evenly over the ~4096 tokens of each input
image (always encoded at about one megapixel), so a change of prompt or image moves the output
only a little: those tests count the pixel values that change rather than expect a new picture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from routing.catalog import CATALOG
from testkit import small_models
from worker.adapters.base import JobCanceled, Runtime
from worker.adapters.qwen_image import QwenImageAdapter, QwenImageEditAdapter, QwenImageEditPlusAdapter

T2I, EDIT, PLUS = "qwen-image", "qwen-image-edit", "qwen-image-edit-2509"
ADAPTER_CLASSES = {T2I: QwenImageAdapter, EDIT: QwenImageEditAdapter, PLUS: QwenImageEditPlusAdapter}
RUNTIME = Runtime(device="cpu", dtype=torch.float32)


def _solid(color: str, size: tuple[int, int] = (64, 48)) -> Image.Image:
    return Image.new("RGB", size, color)


# Each adapter's ordinary request: text only, or one input image.
INPUTS: dict[str, dict[str, Any]] = {
    T2I: {},
    EDIT: {"images": [_solid("black")]},
    PLUS: {"images": [_solid("black")]},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qwen-small")
    small_models.build(out, list(ADAPTER_CLASSES))
    return out


@pytest.fixture(scope="module")
def adapters(built: Path) -> dict[str, Any]:
    return {key: cls(CATALOG[key], str(built / key), RUNTIME) for key, cls in ADAPTER_CLASSES.items()}


def _request(**overrides: Any) -> SimpleNamespace:
    fields: dict[str, Any] = dict(
        prompt="a red fox",
        negative_prompt=None,
        width=64,
        height=48,
        steps=2,
        guidance_scale=4.0,
        seed=0,
        images=[],
        num_outputs=1,
        cache=None,
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


@dataclass
class Run:
    pixels: np.ndarray
    size: tuple[int, int]
    steps: list[tuple[int, int]]
    finite: bool
    seed: int | None


def _run(adapter: Any, request: SimpleNamespace, inputs: dict[str, Any]) -> Run:
    """Run the adapter; also check the decoded floats, which PIL output would hide NaN in."""
    steps: list[tuple[int, int]] = []
    finite: list[bool] = []
    postprocess = adapter.pipe.image_processor.postprocess

    def checking_postprocess(image: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        finite.append(bool(torch.isfinite(image).all()))
        return postprocess(image, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(adapter.pipe.image_processor, "postprocess", checking_postprocess)
        output = adapter.run(request, inputs, lambda done, total: steps.append((done, total)))
    assert len(output.images) == 1
    image = output.images[0]
    assert image.mode == "RGB"
    return Run(np.asarray(image).astype(int), image.size, steps, finite == [True], output.seed)


def _changed(a: Run, b: Run) -> float:
    assert a.size == b.size
    return float((a.pixels != b.pixels).mean())


@pytest.fixture(scope="module")
def baseline(adapters: dict[str, Any]) -> dict[str, Run]:
    return {key: _run(adapter, _request(), INPUTS[key]) for key, adapter in adapters.items()}


# --- the builds -------------------------------------------------------------------------------


def test_builds_have_the_hub_layout(built: Path) -> None:
    import json

    for key in ADAPTER_CLASSES:
        model = built / key
        assert small_models.is_complete(model, key)
        index = json.loads((model / "model_index.json").read_text())
        assert index["text_encoder"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
        assert index["vae"] == ["diffusers", "AutoencoderKLQwenImage"]
        if key == T2I:
            assert "processor" not in index
        else:
            assert index["processor"] == ["transformers", "Qwen2VLProcessor"]
            files = {p.name for p in (model / "processor").iterdir()}
            assert {"preprocessor_config.json", "video_preprocessor_config.json", "tokenizer.json"} <= files


@pytest.mark.parametrize("key", list(ADAPTER_CLASSES))
def test_system_prompt_is_cut_where_the_pipeline_cuts(adapters: dict[str, Any], key: str) -> None:
    # The pipelines drop a fixed number of leading tokens (the system prompt) from the text
    # encoder's output; the tokenizer must split the template as the real one does.
    pipe = adapters[key].pipe
    ids = pipe.tokenizer(pipe.prompt_template_encode.format("a red fox")).input_ids
    kept = pipe.tokenizer.decode(ids[pipe.prompt_template_encode_start_idx :])
    assert kept.startswith({T2I: "a red fox", EDIT: "<|vision_start|>", PLUS: "a red fox"}[key])


def test_vision_tokens_agree_between_tokenizer_processor_and_encoder(adapters: dict[str, Any]) -> None:
    pipe = adapters[EDIT].pipe
    config = pipe.text_encoder.config
    tokenizer = pipe.processor.tokenizer
    assert (
        tokenizer.convert_tokens_to_ids("<|image_pad|>")
        == config.image_token_id
        == pipe.processor.image_token_id
    )
    assert tokenizer.convert_tokens_to_ids("<|vision_start|>") == config.vision_start_token_id
    assert len(tokenizer) <= config.text_config.vocab_size
    # Edit-2509 writes "Picture N: " before each image; the chat template does the same.
    text = tokenizer.apply_chat_template(
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "swap"}],
            }
        ],
        tokenize=False,
        add_generation_prompt=True,
        add_vision_id=True,
    )
    assert "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: " in text


# --- every adapter ------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(ADAPTER_CLASSES))
def test_makes_a_finite_image_of_the_requested_size(baseline: dict[str, Run], key: str) -> None:
    run = baseline[key]
    assert run.size == (64, 48)
    assert run.finite
    assert run.pixels.min() != run.pixels.max()
    assert run.seed == 0


@pytest.mark.parametrize("key", list(ADAPTER_CLASSES))
def test_reports_every_step(baseline: dict[str, Run], key: str) -> None:
    assert baseline[key].steps == [(1, 2), (2, 2)]


# Edit-2509 runs the Edit adapter's code; its own pipeline's use of the prompt and images is
# covered below. Each edit call VAE-encodes its images at ~1 MP (~0.5-1 s here), so calls are few.
@pytest.mark.parametrize("key", [T2I, EDIT])
def test_prompt_conditions_the_image(adapters: dict[str, Any], baseline: dict[str, Run], key: str) -> None:
    other = _run(adapters[key], _request(prompt="a blue car on a mountain road"), INPUTS[key])
    assert _changed(baseline[key], other) > (0.1 if key == T2I else 0.003)


@pytest.mark.parametrize("key", [T2I, EDIT])
def test_cancel_from_the_step_callback_stops_before_decoding(adapters: dict[str, Any], key: str) -> None:
    adapter = adapters[key]
    seen: list[int] = []
    decode = adapter.pipe.vae.decode
    decoded: list[bool] = []

    def on_step(done: int, total: int) -> None:
        seen.append(done)
        raise JobCanceled

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        decoded.append(True)
        return decode(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(adapter.pipe.vae, "decode", counting_decode)
        with pytest.raises(JobCanceled):
            adapter.run(_request(steps=3), INPUTS[key], on_step)
    assert seen == [1] and decoded == []


@pytest.mark.parametrize("key", list(ADAPTER_CLASSES))
def test_size_off_the_multiple_is_refused(adapters: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        adapters[key].run(_request(width=72), INPUTS[key], lambda done, total: None)


# --- text to image: true CFG --------------------------------------------------------------------


def test_guidance_runs_true_cfg_with_a_default_negative_prompt(
    adapters: dict[str, Any], baseline: dict[str, Run]
) -> None:
    adapter = adapters[T2I]
    assert (_run(adapter, _request(), {}).pixels == baseline[T2I].pixels).all()  # same seed, same image
    without_cfg = _run(adapter, _request(guidance_scale=1.0), {})
    assert _changed(baseline[T2I], without_cfg) > 0.1
    negative = _run(adapter, _request(negative_prompt="blurry, low quality"), {})
    assert _changed(baseline[T2I], negative) > 0.1
    # Without CFG the negative prompt has nothing to act on.
    ignored = _run(adapter, _request(guidance_scale=1.0, negative_prompt="blurry, low quality"), {})
    assert _changed(without_cfg, ignored) == 0.0


# --- edits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [EDIT, PLUS])
def test_edit_uses_its_input_image(adapters: dict[str, Any], baseline: dict[str, Run], key: str) -> None:
    other = _run(adapters[key], _request(), {"images": [_solid("white")]})
    assert _changed(baseline[key], other) > 0.01


def test_edit_takes_exactly_one_image(adapters: dict[str, Any]) -> None:
    adapter = adapters[EDIT]
    for images in ([], [_solid("black"), _solid("white")]):
        with pytest.raises(ValueError, match=rf"exactly 1 image \(got {len(images)}\).*2509"):
            adapter.run(_request(), {"images": images}, lambda done, total: None)


def test_edit_needs_both_sides_or_neither(adapters: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="both width and height"):
        adapters[EDIT].run(_request(height=None), INPUTS[EDIT], lambda done, total: None)


def test_edit_without_a_size_follows_the_input_image(adapters: dict[str, Any]) -> None:
    # The pipeline's documented choice: about 1024x1024 pixels at the input's aspect ratio, each
    # side rounded to a multiple of 32.
    wide = _solid("black", (320, 180))
    run = _run(adapters[EDIT], _request(width=None, height=None, guidance_scale=1.0), {"images": [wide]})
    width, height = run.size
    assert width % 32 == 0 and height % 32 == 0
    assert abs(width * height - 1024 * 1024) < 0.05 * 1024 * 1024
    assert math.isclose(width / height, 320 / 180, rel_tol=0.05)
    assert run.finite


def test_edit_2509_combines_up_to_three_images(adapters: dict[str, Any]) -> None:
    adapter = adapters[PLUS]
    request = _request(guidance_scale=1.0)
    # Mixed modes, as uploads come: the adapter hands the pipeline RGB.
    first, second = _solid("black"), _solid("white").convert("L")
    three = _run(adapter, request, {"images": [first, second, _solid("red").convert("RGBA")]})
    assert three.size == (64, 48) and three.finite and three.steps == [(1, 2), (2, 2)]
    # Had the adapter passed on only the first image, this would be the one-image result.
    first_only = _run(adapter, request, {"images": [first]})
    assert _changed(three, first_only) > 0.01

    for count in (0, 4):
        with pytest.raises(ValueError, match=rf"1 to 3 images \(got {count}\)"):
            adapter.run(_request(), {"images": [_solid("black")] * count}, lambda done, total: None)
