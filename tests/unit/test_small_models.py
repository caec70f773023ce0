"""Small random-weight models load and run through the real diffusers pipeline."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from testkit import small_models

KEY = "z-image-turbo"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small-models")
    paths = small_models.build(out, [KEY])
    assert paths == {KEY: out / KEY}
    return out


@pytest.fixture(scope="module")
def pipe(built: Path):
    from diffusers import ZImagePipeline

    # The exact call the worker makes for real weights.
    pipeline = ZImagePipeline.from_pretrained(built / KEY)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _generate(pipe, prompt: str = "a red fox", output_type: str = "pil", **overrides):
    kwargs = dict(
        prompt=prompt,
        width=64,
        height=48,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(0),
        max_sequence_length=32,
        output_type=output_type,
    )
    kwargs.update(overrides)
    return pipe(**kwargs).images[0]


def test_layout_is_a_diffusers_repo(built: Path) -> None:
    from transformers import AutoTokenizer, Qwen2Tokenizer

    model = built / KEY
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (model / sub).is_dir(), sub
    assert small_models.is_complete(model, KEY)
    assert not [p for p in built.iterdir() if p.name.startswith(".")], "temp dirs left behind"

    tok = AutoTokenizer.from_pretrained(model / "tokenizer")
    assert isinstance(tok, Qwen2Tokenizer)
    assert tok.pad_token == "<|endoftext|>" and tok.padding_side == "right"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "a red fox"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=True,
    )
    assert text == "<|im_start|>user\na red fox<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text).input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and tok.decode(ids) == text


def test_generates_a_finite_image(pipe) -> None:
    image = _generate(pipe)
    assert image.size == (64, 48) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels.min() != pixels.max()
    # PIL output would hide NaN as 0s, so check the float output too.
    assert np.isfinite(_generate(pipe, output_type="np")).all()


def test_prompt_conditions_the_image(pipe) -> None:
    fox = np.asarray(_generate(pipe, "a red fox")).astype(int)
    assert (fox == np.asarray(_generate(pipe, "a red fox")).astype(int)).all()
    car = np.asarray(_generate(pipe, "a blue car on a mountain road")).astype(int)
    assert (fox != car).mean() > 0.1


def test_size_must_be_a_multiple_of_16(pipe) -> None:
    with pytest.raises(ValueError, match="divisible by 16"):
        _generate(pipe, width=72)


def test_second_build_skips(built: Path) -> None:
    files = [
        built / KEY / "model_index.json",
        built / KEY / "transformer" / "diffusion_pytorch_model.safetensors",
    ]
    before = [f.stat().st_mtime_ns for f in files]
    start = time.perf_counter()
    small_models.build(built, [KEY])
    assert time.perf_counter() - start < 1.0
    assert [f.stat().st_mtime_ns for f in files] == before


def _use_fake_builder(monkeypatch, fail: bool) -> None:
    def builder(out: Path) -> None:
        (out / "model_index.json").write_text("{}")
        if fail:
            raise KeyboardInterrupt

    monkeypatch.setitem(small_models.BUILDERS, "fake", (1, builder))


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch) -> None:
    _use_fake_builder(monkeypatch, fail=True)
    with pytest.raises(KeyboardInterrupt):
        small_models.build(tmp_path, ["fake"])
    assert list(tmp_path.iterdir()) == []

    # A directory without the marker (e.g. copied by hand) is rebuilt, not trusted.
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "model_index.json").write_text("{}")
    _use_fake_builder(monkeypatch, fail=False)
    small_models.build(tmp_path, ["fake"])
    assert small_models.is_complete(tmp_path / "fake", "fake")
    assert [p.name for p in tmp_path.iterdir()] == ["fake"]


def test_unknown_model_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no small-model builder"):
        small_models.build(tmp_path, ["no-such-model"])


def test_builds_into_one_directory_at_once_build_each_model_once(tmp_path: Path, monkeypatch) -> None:
    """The suite's parallel processes share var/small-models: one builds, the others wait for its
    lock and find the model complete (threads here: each build opens the lock file itself, and
    flock locks of two open files exclude each other within one process too)."""
    runs: list[float] = []

    def slow_builder(out: Path) -> None:
        runs.append(time.monotonic())
        time.sleep(0.5)
        (out / "model_index.json").write_text("{}")

    monkeypatch.setitem(small_models.BUILDERS, "fake", (1, slow_builder))
    out = tmp_path / "models"
    errors: list[BaseException] = []

    def build() -> None:
        try:
            small_models.build(out, ["fake"])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == [] and len(runs) == 1
    assert small_models.is_complete(out / "fake", "fake")
    assert [p.name for p in out.iterdir()] == ["fake"]  # the lock file is beside it, not in it


def test_omni_base_has_the_real_repositorys_components_and_edits(small_models_dir: Path) -> None:
    from diffusers import ZImageOmniPipeline
    from PIL import Image
    from transformers import Siglip2VisionModel

    model = small_models_dir / "z-image-omni-base"
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "ZImageOmniPipeline"
    assert index["siglip"] == ["transformers", "Siglip2VisionModel"]
    assert index["siglip_processor"] == ["transformers", "Siglip2ImageProcessor"]

    # The exact call the worker makes for real weights.
    pipe = ZImageOmniPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.siglip, Siglip2VisionModel)
    assert pipe.transformer.config.siglip_feat_dim == pipe.siglip.config.hidden_size
    # In bfloat16, as on a GPU: the pipeline encodes input images in bfloat16 whatever the VAE's dtype.
    pipe.to(torch.bfloat16)
    edited = pipe(
        image=[Image.new("RGB", (80, 64), (200, 40, 40))],
        prompt="a hat",
        num_inference_steps=2,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert edited.size == (80, 64)  # the input's size
    assert np.asarray(edited).std() > 0
