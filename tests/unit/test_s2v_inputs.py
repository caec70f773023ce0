"""Wan2.2-S2V inputs: speech (WAV, MP3, FLAC) and an optional pose video.

1. Checked before anything is queued (``producer.inputs``): a bad or over-long speech file is
   refused naming ``audio``, a pose video that is not a (short enough) video naming ``pose_video``.
2. The output: the MP4 that group rank 0 encodes carries the input speech as an AAC stream as
   long as the speech.
3. The official code's input path, on the small checkpoint (``testkit.small_models.s2v``): the
   ``AudioEncoder`` reads each format through the PyAV stand-in for ``librosa.load``, the pose
   reader stands in for decord, torchvision's three transforms have stand-ins where torchvision
   cannot load, and ``wan.WanS2V`` itself generates on the CPU with the SDPA attention that
   replaces flash-attn (one rank here; two over gloo in ``tests/integration/test_group.py``),
   through ``testkit.s2v``'s group model: the fleet's own runs on CUDA at the size asked for.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from producer.inputs import InputLimits, resolve_inputs
from producer.tenant_keys import KeyScope
from routing.catalog import get_model
from routing.errors import InvalidRequest
from routing.io.net import UrlPolicy
from routing.io.storage import LocalStorage
from routing.schemas import SpeechToVideoRequest, parse_request
from worker.adapters.wan_s2v import standins
from worker.media import encode_wav

S2V = "wan2.2-s2v-14b"
SPEC = get_model(S2V)
# Speech longer than the longest video S2V makes (10 clips of 80 frames at 16 fps) is refused.
MAX_SPEECH_S = SPEC.video.max_frames / SPEC.video.fps


# --- media makers -------------------------------------------------------------------------------


def _tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * 220 * t) * 0.3).astype(np.float32)


def wav_bytes(seconds: float, rate: int = 16000) -> bytes:
    return encode_wav(_tone(seconds, rate), rate)


def encoded_audio(fmt: str, seconds: float, rate: int = 16000) -> bytes:
    """MP3 or FLAC made with PyAV (its FFmpeg has both encoders)."""
    codec = {"mp3": "libmp3lame", "flac": "flac"}[fmt]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        sample_format = "s16p" if fmt == "mp3" else "s16"
        samples = (_tone(seconds, rate) * 32767).astype(np.int16)[None, :]
        frame = av.AudioFrame.from_ndarray(samples, format=sample_format, layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buffer.getvalue()


def speech(fmt: str, seconds: float) -> bytes:
    return wav_bytes(seconds) if fmt == "wav" else encoded_audio(fmt, seconds)


def png_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def pose_frames(n: int, size: tuple[int, int] = (64, 48)) -> list[Image.Image]:
    return [Image.new("RGB", size, (i * 9 % 256, 100, 255 - i * 5 % 256)) for i in range(n)]


def mp4_bytes(n: int, fps: int = 16) -> bytes:
    from worker.media import encode_mp4

    return encode_mp4(pose_frames(n), fps)


def audio_duration_s(mp4: bytes) -> tuple[float, str]:
    """Seconds of decoded audio in the MP4's first audio stream, and its codec."""
    with av.open(io.BytesIO(mp4)) as c:
        stream = c.streams.audio[0]
        samples = sum(frame.samples for frame in c.decode(stream))
        return samples / stream.codec_context.sample_rate, stream.codec_context.name


# --- 1. refused before enqueue ------------------------------------------------------------------


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "objects")


def _request(storage: LocalStorage, audio: bytes, pose: bytes | None = None) -> SpeechToVideoRequest:
    storage.put("uploads/_/face.png", png_bytes(), "image/png")
    storage.put("uploads/_/speech", audio, "application/octet-stream")
    data = {
        "model": S2V,
        "prompt": "a person talks to the camera",
        "image": {"key": "uploads/_/face.png"},
        "audio": {"key": "uploads/_/speech"},
        "width": 1024,
        "height": 704,
    }
    if pose is not None:
        storage.put("uploads/_/pose", pose, "application/octet-stream")
        data["pose_video"] = {"key": "uploads/_/pose"}
    return parse_request(data)


def _resolve(storage: LocalStorage, request: SpeechToVideoRequest) -> SpeechToVideoRequest:
    return resolve_inputs(
        request, "0" * 32, storage, UrlPolicy(), InputLimits(), KeyScope("", lambda _: None)
    )


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac"])
def test_speech_in_each_format_is_accepted(storage: LocalStorage, fmt: str) -> None:
    request = _request(storage, speech(fmt, 2.0), pose=mp4_bytes(20))
    resolved = _resolve(storage, request)
    assert resolved.audio.key == "uploads/_/speech" and resolved.pose_video.key == "uploads/_/pose"


@pytest.mark.parametrize(
    ("audio", "words"),
    [
        (b"this is not audio at all" * 100, "audio in a supported format"),
        (png_bytes(), "audio in a supported format"),
        (wav_bytes(MAX_SPEECH_S + 1.0, rate=8000), f"longer than the limit of {MAX_SPEECH_S} s"),
        (wav_bytes(1.0)[:44], "no decodable samples"),  # a WAV header and no samples
    ],
    ids=["garbage", "an-image", "too-long", "truncated"],
)
def test_bad_speech_is_refused_naming_audio(storage: LocalStorage, audio: bytes, words: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        _resolve(storage, _request(storage, audio))
    assert raised.value.fields == ["audio"]
    assert words in str(raised.value)


@pytest.mark.parametrize(
    ("pose", "words"),
    [
        (png_bytes(), "a video in a supported container"),
        (wav_bytes(2.0), "a video in a supported container"),
        (b"\x00" * 5000, "a video in a supported container"),
        (mp4_bytes(int(MAX_SPEECH_S) + 2, fps=1), "long; the limit is"),
    ],
    ids=["an-image", "audio", "zeros", "too-long"],
)
def test_a_pose_video_that_is_not_a_usable_video_is_refused(
    storage: LocalStorage, pose: bytes, words: str
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        _resolve(storage, _request(storage, wav_bytes(2.0), pose=pose))
    assert raised.value.fields == ["pose_video"]
    assert words in str(raised.value)


def test_submit_refuses_bad_speech_and_queues_nothing(client, redis_client) -> None:
    client.storage.put("uploads/_/face.png", png_bytes(), "image/png")
    client.storage.put("uploads/_/speech", b"not audio" * 500, "application/octet-stream")
    before = {k: redis_client.llen(k) for k in redis_client.keys("h100x8*")}
    with pytest.raises(InvalidRequest) as raised:
        client.submit(
            {
                "model": S2V,
                "prompt": "a person talks",
                "image": {"key": "uploads/_/face.png"},
                "audio": {"key": "uploads/_/speech"},
            }
        )
    assert raised.value.fields == ["audio"]
    assert {k: redis_client.llen(k) for k in redis_client.keys("h100x8*")} == before


# --- 2. the output carries the speech -----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac"])
def test_the_groups_mp4_has_the_speech_as_long_as_it_was(tmp_path: Path, fmt: str) -> None:
    from worker.adapters.base import Video
    from worker.group.files import write_output

    seconds = 3.0
    audio = speech(fmt, seconds)
    # 2.5 s of video (40 frames at 16 fps): the speech is longer and is kept whole.
    generated = Video(pose_frames(40, (66, 50)), fps=16, seed=1, audio=audio)

    result = write_output(generated, "job-1", tmp_path)

    mp4 = Path(result.path).read_bytes()
    duration, codec = audio_duration_s(mp4)
    assert codec == "aac"
    # AAC adds an encoder delay of a frame or two (1024 samples each); MP3 pads its own.
    assert duration == pytest.approx(seconds, abs=0.1)
    with av.open(io.BytesIO(mp4)) as c:
        video = c.streams.video[0]
        assert sum(1 for _ in c.decode(video)) == 40
        assert video.average_rate == 16
    assert (result.width, result.height, result.frame_count, result.fps) == (66, 50, 40, 16)


def test_write_inputs_gives_the_ranks_the_stored_bytes_they_decode_to_the_same_inputs(tmp_path: Path) -> None:
    from worker.adapters.base import Inputs
    from worker.group.files import read_inputs, write_inputs

    face = png_bytes((40, 30))
    audio = encoded_audio("flac", 1.0)
    pose = mp4_bytes(12, fps=24)
    inputs = Inputs.decode({"image": face, "audio": audio, "pose_video": pose}, job_id="job-1")

    files = write_inputs(inputs, tmp_path)
    again = read_inputs(files)

    assert Path(files["audio"]).suffix == ".flac" and Path(files["audio"]).read_bytes() == audio
    # The pose video reaches the ranks as it was stored: no lossy re-encode on the way.
    assert Path(files["pose_video"]).read_bytes() == pose and Path(files["image"]).read_bytes() == face
    assert np.array_equal(np.asarray(again["image"]), np.asarray(inputs["image"]))
    assert again["audio"] == audio
    assert len(again["pose_video"]) == 12 and again["pose_video_fps"] == pytest.approx(24.0)


# --- 3. the official code's input path on the small checkpoint ----------------------------------


@pytest.fixture(scope="module")
def wan():
    # Not importorskip("wan"): the package's own __init__ imports every task, and Animate's need
    # opencv, peft, decord... (worker.adapters.s2v imports only what S2V uses).
    if importlib.util.find_spec("wan") is None:
        pytest.skip("wan22 is not installed (pip install --no-deps wan22==2.2.11 einops easydict)")
    for needed in ("einops", "easydict"):
        pytest.importorskip(needed)
    from worker.adapters import s2v

    return s2v


@pytest.fixture(scope="module")
def small_s2v(wan, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from testkit.small_models.s2v import build_wan22_s2v_14b

    out = tmp_path_factory.mktemp("small-s2v")
    build_wan22_s2v_14b(out)
    return out


def test_the_small_checkpoint_has_the_official_layout(small_s2v: Path, wan) -> None:
    config = wan.import_wan_modules()["configs"].WAN_CONFIGS["s2v-14B"]
    for name in (
        config.t5_checkpoint,
        config.vae_checkpoint,
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ):
        assert (small_s2v / name).is_file(), name
    assert (small_s2v / config.t5_tokenizer / "tokenizer.json").is_file()
    assert (small_s2v / config.wav2vec / "model.safetensors").is_file()
    dit = json.loads((small_s2v / "config.json").read_text())
    assert dit["_class_name"] == "WanModel_S2V" and dit["enable_framepack"] and dit["enable_adain"]


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac"])
def test_the_official_audio_encoder_reads_each_format(small_s2v: Path, wan, tmp_path: Path, fmt: str) -> None:
    import torch

    encoder_module = wan.import_wan_modules()["audio_encoder"]
    encoder = encoder_module.AudioEncoder(model_id=str(small_s2v / "wav2vec2-large-xlsr-53-english"))
    path = tmp_path / f"speech.{fmt}"
    path.write_bytes(speech(fmt, 2.0))

    features = encoder.extract_audio_feat(str(path), return_all_layers=True)
    buckets, clips = encoder.get_audio_embed_bucket_fps(features, fps=16, batch_frames=80, m=0)

    # 25 hidden states (24 layers + embeddings), at wav2vec2's 50 Hz resampled to 30 per second.
    assert features.shape[0] == 25 and features.shape[1] == pytest.approx(2.0 * 30, abs=2)
    assert clips == 1 and buckets.shape[0] == 80 and torch.isfinite(buckets).all()


def test_the_pose_reader_stands_in_for_decord(wan, tmp_path: Path) -> None:
    path = tmp_path / "pose.mp4"
    path.write_bytes(mp4_bytes(30, fps=25))

    reader = standins.PyAVVideoReader(str(path))

    assert reader.get_avg_fps() == pytest.approx(25.0)
    assert len(reader) == 30
    assert reader.get_batch([0, 5, 29]).asnumpy().shape == (3, 48, 64, 3)


def test_sdpa_attention_matches_flash_attention_semantics(wan) -> None:
    import torch

    from worker.adapters.wan_s2v.attention import sdpa_attention

    torch.manual_seed(0)
    b, lq, lk, heads, dim = 2, 7, 9, 4, 8
    q, k, v = torch.randn(b, lq, heads, dim), torch.randn(b, lk, heads, dim), torch.randn(b, lk, heads, dim)
    k_lens = torch.tensor([9, 5])

    out = sdpa_attention(q, k, v, k_lens=k_lens)

    for i, length in enumerate(k_lens.tolist()):
        scores = torch.einsum("qhd,khd->hqk", q[i], k[i, :length]) / math.sqrt(dim)
        expected = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[i, :length])
        assert torch.allclose(out[i], expected, atol=1e-5)
    # Grouped heads (2 key heads for 4 query heads) and padded query rows.
    grouped = sdpa_attention(q, k[:, :, :2], v[:, :, :2], q_lens=torch.tensor([7, 3]))
    assert grouped.shape == q.shape and not grouped[1, 3:].any()


def test_the_torchvision_stand_in_resizes_and_crops_as_torchvision(wan) -> None:
    import torch

    image = Image.new("RGB", (100, 50), (255, 0, 0))
    # Resize(int) sets the shorter side and keeps the aspect ratio; CenterCrop pads what is missing.
    resized = standins.Resize(32)(image)
    assert resized.size == (64, 32)
    cropped = standins.CenterCrop((32, 80))(resized)
    assert cropped.size == (80, 32)
    pixels = standins.ToTensor()(cropped)
    assert pixels.shape == (3, 32, 80) and pixels.dtype == torch.float32
    assert pixels[0, :, 8:72].min() == 1.0 and pixels[:, :, :8].max() == 0.0  # 8 columns of padding

    frames = torch.rand(5, 3, 60, 40) * 2 - 1  # pose frames, [N, C, H, W] in [-1, 1]
    out = standins.CenterCrop((32, 16))(standins.Resize(16)(frames))
    assert out.shape == (5, 3, 32, 16) and out.dtype == frames.dtype
    flat = torch.full((1, 3, 60, 40), 0.25)
    assert torch.allclose(standins.Resize(20)(flat), torch.full((1, 3, 30, 20), 0.25))


# A hang guard, not a bound: the official code's three runs on the CPU take about 11 s alone; with
# the small checkpoint's wider VAE they took up to 1019 s inside one suite with another beside it.
@pytest.mark.timeout(1800)
def test_the_official_wan_s2v_runs_on_the_cpu_and_the_pose_video_drives_it(
    small_s2v: Path, wan, tmp_path: Path
) -> None:
    """``wan.WanS2V`` itself (one rank, no process group) through testkit's group model."""
    import torch

    from routing.catalog import get_model
    from testkit.s2v import SmallS2VGroupModel
    from worker.adapters.base import JobCanceled, Runtime

    model = SmallS2VGroupModel(
        get_model(S2V), str(small_s2v), Runtime.resolve("cpu", "auto"), wan.GroupPlace(0, 1, 0)
    )
    (tmp_path / "face.png").write_bytes(png_bytes((120, 90)))
    (tmp_path / "speech.wav").write_bytes(wav_bytes(1.5))
    (tmp_path / "pose.mp4").write_bytes(mp4_bytes(40))
    request = SpeechToVideoRequest.model_validate(
        {"model": S2V, "prompt": "a person talks", "image": {"key": "f"}, "audio": {"key": "s"}}
    ).model_copy(update={"width": 832, "height": 480, "steps": 2, "seed": 7, "guidance_scale": 4.5})
    files = {"image": tmp_path / "face.png", "audio": tmp_path / "speech.wav"}

    steps: list[tuple[int, int]] = []
    plain = model.run(request, files, lambda step, total: steps.append((step, total)), tmp_path)
    posed = model.run(request, {**files, "pose_video": tmp_path / "pose.mp4"}, lambda *_: None, tmp_path)

    assert steps == [(1, 2), (2, 2)]  # one clip: 1.5 s of speech
    # One 80-frame clip less the 3 frames the first clip drops; the small checkpoint renders
    # 832*480 at its 128*64 cap.
    assert len(plain.frames) == 77 and plain.frames[0].size == (128, 64) and plain.fps == 16
    assert plain.audio == (tmp_path / "speech.wav").read_bytes()
    a = torch.tensor(np.stack([np.asarray(f) for f in plain.frames]), dtype=torch.float32)
    b = torch.tensor(np.stack([np.asarray(f) for f in posed.frames]), dtype=torch.float32)
    # Same seed, same speech: what differs is the pose conditioning (random weights, two steps:
    # about one grey level on average).
    assert a.std() > 0 and (a - b).abs().mean() > 0.2

    def cancel_at_1(step: int, total: int) -> None:
        raise JobCanceled("canceled")

    with pytest.raises(JobCanceled):
        model.run(request, files, cancel_at_1, tmp_path)


def test_the_fleets_s2v_model_renders_the_size_asked_for_and_runs_on_cuda_only(wan) -> None:
    """The cap of the small checkpoint and the CPU are testkit's: the product has neither."""
    request = SpeechToVideoRequest.model_validate(
        {"model": S2V, "prompt": "a person talks", "image": {"key": "f"}, "audio": {"key": "s"}}
    ).model_copy(update={"width": 832, "height": 480})
    model = object.__new__(wan.S2VGroupModel)  # the three seams need no loaded weights

    assert model._max_area(request) == 832 * 480
    with model._loading("/no/such/checkpoint") as loading:
        assert loading is None
    with pytest.raises(ValueError, match="runs on CUDA, not cpu"):
        model._config(wan.import_wan_modules(), "cpu")
