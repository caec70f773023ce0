"""Wan2.2-S2V-14B through the official code (PyPI ``wan22``: ``wan.WanS2V``, config ``s2v-14B``),
as a *group model*: every rank of the resident torchrun group (``worker.group``) holds one, with
the DiT and T5 sharded by FSDP and the DiT's attention split over the ranks by Ulysses sequence
parallelism, exactly as upstream ``generate.py --dit_fsdp --t5_fsdp --ulysses_size W`` sets it up.

Nothing of the package's source is copied here. What it needs to run in the fleet is done to its
modules at import time (``import_wan``), each a module attribute replaced, never a file changed:

* attention: every module that calls ``flash_attention`` gets ``sdpa_attention`` instead (PyTorch
  scaled-dot-product attention with flash-attn's varlen semantics), unless flash-attn is installed;
* ``wan/__init__.py`` is not run: it imports every task (Animate needs opencv, peft, decord,
  sam2...), and S2V needs none of them;
* ``wan/modules/t5.py`` evaluates ``torch.cuda.current_device()`` as a default argument when it is
  imported, which raises on a CPU-only torch: it is imported with that call answering "cpu";
* media: ``librosa.load``, ``decord.VideoReader`` and (where it cannot be imported) torchvision's
  transforms are read through PyAV, the decoder the producer checked the upload with
  (``worker.adapters.wan_standins`` says what each is and why);
* progress: the denoising loop has no callback, so the scheduler classes it builds are replaced by
  subclasses whose ``step`` reports to the job's ``on_step`` (which may raise ``JobCanceled``: the
  loop ends at that step on every rank, since every rank reports the same step).

On a CPU (the tests: two ranks over gloo) the same code runs with four more replacements, all in
``wan.speech2video``'s namespace (``run_on_cpu``): its ``torch.device("cuda:N")`` names the CPU;
FSDP (``shard_model``) gets the CPU as its device, float32 as its compute dtype and no rank-0
broadcast of the weights (FSDP broadcasts only from a GPU; every rank read the same files); the
Ulysses attention (``sp_attn_forward_s2v``) keeps float32 instead of casting q, k, v to bfloat16;
and the config's ``param_dtype`` and ``t5_dtype`` are float32. On CUDA the official code casts to
bfloat16 inside ``torch.amp.autocast("cuda")`` and opens float32 regions with
``torch.cuda.amp.autocast(dtype=torch.float32)``; CPU autocast has no float32 regions (bfloat16
and float16 only), so on a CPU the model runs in float32 throughout, which needs no autocast.

Small random-weight checkpoints (``worker.small_models.s2v``) shrink T5 and the VAE, whose sizes
the official code hard-codes, and cap the rendered area; a checkpoint says so in
``fleet-small-model.json`` and only then are those read from it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import math
import sys
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routing.catalog import ModelSpec
from worker.adapters import wan_standins as standins
from worker.adapters.base import Generated, Runtime, StepCallback
from worker.group.spec import GroupPlace

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

TASK = "s2v-14B"
# Written by the small-model builder; a real checkpoint has none.
SMALL_MODEL_FILE = "fleet-small-model.json"
# Frames of one clip: the catalog's frames_step, and generate.py's --infer_frames default.
CLIP_FRAMES = 80

# --- Attention --------------------------------------------------------------------------------


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_lens: torch.Tensor | None = None,
    k_lens: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    q_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    deterministic: bool = False,
    dtype: torch.dtype | None = None,
    version: int | None = None,
) -> torch.Tensor:
    """``wan.modules.attention.flash_attention`` on ``torch.nn.functional.scaled_dot_product_attention``.

    Same arguments and result: q ``[B, Lq, Nq, C]``, k/v ``[B, Lk, Nk, C]`` (Nq a multiple of
    Nk), output ``[B, Lq, Nq, C]`` in q's dtype. ``k_lens`` masks the padded keys of each sample
    (flash-attn's varlen packing drops them); ``q_lens`` zeroes the padded query rows. Inputs that
    are not half precision are cast to ``dtype`` (bfloat16 by default) as flash-attn needs; on a
    CPU they stay as they are. Sliding windows are refused: S2V never uses them.
    """
    import torch
    import torch.nn.functional as F

    if tuple(window_size) != (-1, -1):
        raise NotImplementedError("sdpa_attention has no sliding-window attention")
    out_dtype = q.dtype
    if q.device.type == "cuda":
        half = dtype if dtype is not None else torch.bfloat16
        q, k, v = (x if x.dtype in (torch.float16, torch.bfloat16) else x.to(half) for x in (q, k, v))
    q, k = q.to(v.dtype), k.to(v.dtype)
    if q_scale is not None:
        q = q * q_scale
    lq, lk = q.size(1), k.size(1)

    mask = None
    if k_lens is not None:
        k_lens = k_lens.to(device=q.device)
        if bool((k_lens < lk).any()):
            keep = torch.arange(lk, device=q.device)[None, :] < k_lens[:, None]  # [B, Lk]
            mask = keep[:, None, None, :]  # broadcast over heads and queries
    if causal and mask is not None:
        causal_keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        mask = mask & causal_keep
        causal = False

    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=causal,
        scale=softmax_scale,
        enable_gqa=q.size(2) != k.size(2),
    ).transpose(1, 2)
    if q_lens is not None:
        q_lens = q_lens.to(device=q.device)
        if bool((q_lens < lq).any()):
            rows = torch.arange(lq, device=q.device)[None, :] < q_lens[:, None]
            out = out * rows[:, :, None, None].to(out.dtype)
    return out.to(out_dtype).contiguous()


# --- Importing the official code --------------------------------------------------------------

# Modules that bind ``flash_attention`` at import and call it by that name.
_FLASH_CALLERS = (
    "wan.modules.attention",
    "wan.modules.model",
    "wan.modules.s2v.model_s2v",
    "wan.modules.s2v.motioner",
    "wan.distributed.ulysses",
)

_import_lock = threading.Lock()
_imported: dict[str, types.ModuleType] = {}


def _package_without_init(name: str) -> None:
    """Register package ``name`` so its submodules import, without running its ``__init__``."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(
            f"{name} is not installed: pip install --no-deps wan22==2.2.11 (plus einops, easydict)"
        )
    module = types.ModuleType(name)
    module.__path__ = list(spec.submodule_search_locations)
    module.__spec__ = spec
    module.__package__ = name
    module.__file__ = spec.origin
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)


@contextlib.contextmanager
def _cuda_device_answers_cpu() -> Iterator[None]:
    import torch

    if torch.cuda.is_available():
        yield
        return
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.cuda.current_device = original


def flash_attn_available() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in ("flash_attn_interface", "flash_attn"))


def import_wan_modules() -> dict[str, types.ModuleType]:
    """The official model modules (DiT, T5, VAE, configs), patched; no torchvision needed."""
    with _import_lock:
        if "model_s2v" in _imported:
            return _imported
        # The package's torch.cuda.amp.autocast calls warn on every use (FutureWarning).
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"wan\.")
        warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.autocast.*", category=FutureWarning)
        _package_without_init("wan")
        _package_without_init("wan.modules")
        with _cuda_device_answers_cpu():
            t5 = importlib.import_module("wan.modules.t5")
        _package_without_init("wan.modules.s2v")
        found = {
            "configs": importlib.import_module("wan.configs"),
            "t5": t5,
            "vae2_1": importlib.import_module("wan.modules.vae2_1"),
            "tokenizers": importlib.import_module("wan.modules.tokenizers"),
            "model_s2v": importlib.import_module("wan.modules.s2v.model_s2v"),
            "attention": importlib.import_module("wan.modules.attention"),
        }
        importlib.import_module("wan.distributed.ulysses")
        if not flash_attn_available():
            for name in _FLASH_CALLERS:
                module = importlib.import_module(name)
                if hasattr(module, "flash_attention"):
                    module.flash_attention = sdpa_attention
        _install_small_model_hooks(found["t5"], found["vae2_1"])
        _imported.update(found)
        return _imported


def import_wan_audio_encoder() -> types.ModuleType:
    """``wan.modules.s2v.audio_encoder``, reading audio through PyAV (librosa not needed)."""
    import_wan_modules()
    with _import_lock:
        if "audio_encoder" not in _imported:
            if importlib.util.find_spec("librosa") is None:
                sys.modules["librosa"] = standins.librosa_module()
            audio_encoder = importlib.import_module("wan.modules.s2v.audio_encoder")
            audio_encoder.librosa = standins.librosa_module()
            _imported["audio_encoder"] = audio_encoder
        return _imported["audio_encoder"]


def import_wan_pipeline() -> dict[str, types.ModuleType]:
    """``import_wan_modules`` plus ``wan.speech2video`` and its audio encoder."""
    modules = import_wan_modules()
    audio_encoder = import_wan_audio_encoder()
    with _import_lock:
        if "speech2video" in _imported:
            return _imported
        if importlib.util.find_spec("decord") is None:
            sys.modules["decord"] = standins.decord_module()
        if standins.torchvision_importable():
            s2v = importlib.import_module("wan.speech2video")
        else:
            # Only while wan.speech2video imports: nothing else in the process sees the stand-in.
            with _modules_while_importing(standins.torchvision_modules()):
                s2v = importlib.import_module("wan.speech2video")
        s2v.VideoReader = standins.PyAVVideoReader
        s2v.FlowUniPCMultistepScheduler = _reporting(s2v.FlowUniPCMultistepScheduler)
        s2v.FlowDPMSolverMultistepScheduler = _reporting(s2v.FlowDPMSolverMultistepScheduler)
        s2v.tqdm = lambda iterable, *args, **kwargs: iterable  # no progress bars in the group log
        modules.update(speech2video=s2v, audio_encoder=audio_encoder)
        return modules


@contextlib.contextmanager
def _modules_while_importing(modules: dict[str, types.ModuleType]) -> Iterator[None]:
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


# --- On a CPU ---------------------------------------------------------------------------------


class _TorchNamingTheCpu(types.ModuleType):
    """``torch`` as ``wan.speech2video`` sees it on a CPU: a CUDA device names the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        import torch

        return getattr(torch, name)

    @staticmethod
    def device(*args: Any, **kwargs: Any) -> torch.device:
        import torch

        device = torch.device(*args, **kwargs)
        return torch.device("cpu") if device.type == "cuda" else device


def run_on_cpu(speech2video: types.ModuleType) -> None:
    """Let ``WanS2V`` build and generate on a CPU, single or sharded over gloo (module docstring)."""
    import torch

    if isinstance(speech2video.torch, _TorchNamingTheCpu):
        return
    warnings.filterwarnings("ignore", message=r".*CUDA is not available.*Disabling", category=UserWarning)
    shard_model = speech2video.shard_model
    sp_attn_forward_s2v = speech2video.sp_attn_forward_s2v

    def shard_model_on_cpu(model: Any, device_id: Any = None, **kwargs: Any) -> Any:
        return shard_model(
            model,
            **{
                **kwargs,
                "device_id": torch.device("cpu"),
                "param_dtype": torch.float32,
                "sync_module_states": False,
            },
        )

    def sp_attn_forward_in_float32(
        self: Any, x: Any, seq_lens: Any, grid_sizes: Any, freqs: Any, dtype: Any = None
    ) -> Any:
        return sp_attn_forward_s2v(self, x, seq_lens, grid_sizes, freqs, dtype=torch.float32)

    speech2video.torch = _TorchNamingTheCpu()
    speech2video.shard_model = shard_model_on_cpu
    speech2video.sp_attn_forward_s2v = sp_attn_forward_in_float32


def config_for(config: Any, device_type: str) -> Any:
    """The s2v-14B config as it runs on ``device_type``: float32 on a CPU (module docstring)."""
    if device_type == "cuda":
        return config
    import copy

    import torch

    config = copy.deepcopy(config)
    config.param_dtype = torch.float32
    config.t5_dtype = torch.float32
    return config


# --- Small checkpoints ------------------------------------------------------------------------

# Sizes a small checkpoint gives T5 and the VAE, read from SMALL_MODEL_FILE while it loads.
_small_sizes: dict[str, dict[str, Any]] = {}


def _install_small_model_hooks(t5: types.ModuleType, vae: types.ModuleType) -> None:
    """``umt5_xxl`` and ``_video_vae`` take their sizes as keyword overrides; while a small
    checkpoint loads, they get the checkpoint's."""
    umt5_xxl, video_vae = t5.umt5_xxl, vae._video_vae

    def small_umt5_xxl(**kwargs: Any) -> Any:
        return umt5_xxl(**{**kwargs, **_small_sizes.get("t5", {})})

    def small_video_vae(*args: Any, **kwargs: Any) -> Any:
        return video_vae(*args, **{**kwargs, **_small_sizes.get("vae", {})})

    t5.umt5_xxl = small_umt5_xxl
    vae._video_vae = small_video_vae


@contextlib.contextmanager
def small_model_sizes(checkpoint_dir: str | Path) -> Iterator[dict[str, Any] | None]:
    """While loading ``checkpoint_dir``: its T5 and VAE sizes if it is a small checkpoint."""
    path = Path(checkpoint_dir) / SMALL_MODEL_FILE
    sizes = json.loads(path.read_text()) if path.is_file() else None
    _small_sizes.clear()
    if sizes:
        _small_sizes.update({k: v for k, v in sizes.items() if k in ("t5", "vae")})
    try:
        yield sizes
    finally:
        _small_sizes.clear()


# --- Progress ---------------------------------------------------------------------------------

_step_hook = threading.local()


def _reporting(scheduler_class: type) -> type:
    """A subclass of the scheduler whose ``step`` calls the current job's step hook."""

    class Reporting(scheduler_class):  # type: ignore[misc, valid-type]
        def step(self, *args: Any, **kwargs: Any) -> Any:
            result = super().step(*args, **kwargs)
            hook = getattr(_step_hook, "fn", None)
            if hook is not None:
                hook()
            return result

    Reporting.__name__ = Reporting.__qualname__ = scheduler_class.__name__
    return Reporting


@dataclass
class _Progress:
    steps_per_clip: int
    clips: int
    done: int = 0


@contextlib.contextmanager
def _reporting_steps(hook: Callable[[], None]) -> Iterator[None]:
    _step_hook.fn = hook
    try:
        yield
    finally:
        _step_hook.fn = None


# --- The group model --------------------------------------------------------------------------


class S2VGroupModel:
    """``wan.WanS2V`` resident on one rank of the group; ``run`` is called on every rank with the
    same job, and returns the video on rank 0 (None elsewhere)."""

    def __init__(self, spec: ModelSpec, weights: str, runtime: Runtime, place: GroupPlace):
        from worker import adapters

        adapters._quiet_loading()
        modules = import_wan_pipeline()
        device_type = runtime.device.split(":")[0]
        if device_type not in ("cuda", "cpu"):
            raise ValueError(f"Wan2.2-S2V runs on CUDA or the CPU, not {runtime.device}")
        if device_type == "cpu":
            run_on_cpu(modules["speech2video"])
        self.spec = spec
        self.place = place
        self.config = config_for(modules["configs"].WAN_CONFIGS[TASK], device_type)
        sharded = place.world_size > 1
        # Ulysses splits the DiT's heads over the ranks (generate.py asserts the same).
        dit_config = Path(weights) / "config.json"
        heads = json.loads(dit_config.read_text())["num_heads"] if dit_config.is_file() else None
        heads = heads or self.config.num_heads
        if sharded and heads % place.world_size:
            raise ValueError(f"{heads} attention heads do not split over {place.world_size} ranks")
        with small_model_sizes(weights) as small:
            # What upstream generate.py builds for --dit_fsdp --t5_fsdp --ulysses_size W.
            self.pipe = modules["speech2video"].WanS2V(
                config=self.config,
                checkpoint_dir=weights,
                device_id=place.local_rank,
                rank=place.rank,
                t5_fsdp=sharded,
                dit_fsdp=sharded,
                use_sp=sharded,
                t5_cpu=False,
                convert_model_dtype=False,
            )
        # A small checkpoint renders at most this many pixels whatever the size asked for.
        self.max_area: int | None = (small or {}).get("max_area")
        self._audio_clips: int | None = None
        encode_audio = self.pipe.encode_audio

        def counting_encode_audio(*args: Any, **kwargs: Any) -> Any:
            embedding, clips = encode_audio(*args, **kwargs)
            self._audio_clips = clips
            return embedding, clips

        self.pipe.encode_audio = counting_encode_audio  # how many clips the speech needs

    def run(
        self, request: Any, files: dict[str, Any], on_step: StepCallback, workdir: Path
    ) -> Generated | None:
        # The caller's width and height decide the frame: the reference image is cropped to their
        # aspect ratio and scaled to them (the official code keeps a smaller image's size), and
        # the official code fits that in width x height pixels at multiples of 64 (so 480 and
        # 720 high requests come out 448 and 704 high, as upstream's --size 832*480 does).
        reference = workdir / f"reference.rank{self.place.rank}.png"  # the ranks share workdir
        _reference_image(files["image"], request.width, request.height).save(reference)
        audio_path = files["audio"]
        progress = _Progress(steps_per_clip=request.steps, clips=0)

        def step() -> None:
            if not progress.clips:
                available = self._audio_clips or 1
                progress.clips = min(request.clips or available, available)
            progress.done += 1
            on_step(progress.done, progress.steps_per_clip * progress.clips)

        self._audio_clips = None
        with _reporting_steps(step):
            video = self.pipe.generate(
                input_prompt=request.prompt,
                ref_image_path=str(reference),
                audio_path=str(audio_path),
                enable_tts=False,
                tts_prompt_audio=None,
                tts_prompt_text=None,
                tts_text=None,
                num_repeat=request.clips,
                pose_video=str(files["pose_video"]) if files.get("pose_video") else None,
                max_area=min(request.width * request.height, self.max_area or math.inf),
                infer_frames=CLIP_FRAMES,
                shift=self.config.sample_shift,
                sample_solver="unipc",
                sampling_steps=request.steps,
                guide_scale=request.guidance_scale,
                n_prompt=request.negative_prompt or "",
                seed=request.seed,
                offload_model=False,  # resident: the point of the group
                init_first_frame=False,
            )
        if self.place.rank != 0:
            return None
        frames = video_to_frames(video)
        return Generated(
            frames=frames,
            fps=int(self.config.sample_fps),
            seed=request.seed,
            audio=Path(audio_path).read_bytes(),
        )


def video_to_frames(video: torch.Tensor) -> list[Image.Image]:
    """The official output, (C, N, H, W) in [-1, 1], as RGB frames; NaN is an error."""
    import torch
    from PIL import Image

    if not bool(torch.isfinite(video).all()):
        raise RuntimeError("the model produced NaN or infinite pixels")
    pixels = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(frame.numpy()) for frame in pixels.permute(1, 2, 3, 0).cpu()]


def _reference_image(path: str | Path, width: int, height: int) -> Image.Image:
    """The image centre-cropped to ``width / height`` and resized to ``width x height``."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
    target = width / height
    w, h = im.size
    if not math.isclose(w / h, target, rel_tol=1e-3):
        if w / h > target:
            new_w = max(1, round(h * target))
            left = (w - new_w) // 2
            im = im.crop((left, 0, left + new_w, h))
        else:
            new_h = max(1, round(w / target))
            top = (h - new_h) // 2
            im = im.crop((0, top, w, top + new_h))
    return im if im.size == (width, height) else im.resize((width, height), Image.Resampling.LANCZOS)


__all__ = [
    "GroupPlace",
    "S2VGroupModel",
    "config_for",
    "import_wan_audio_encoder",
    "import_wan_modules",
    "import_wan_pipeline",
    "run_on_cpu",
    "sdpa_attention",
    "small_model_sizes",
    "video_to_frames",
]
