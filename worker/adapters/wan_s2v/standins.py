"""What the official Wan2.2 code imports for reading media, on the fleet's own readers.

``wan/speech2video.py`` and its audio encoder, and ``wan/image2video.py``, import three media
libraries for a handful of calls. The fleet already decodes every upload with PyAV (``worker.media``) before it is queued, so
the official code gets the same decoders through these stand-ins, each with exactly the surface
it uses:

* ``librosa.load(path, sr=16000)`` (``AudioEncoder.extract_audio_feat``): librosa pulls in
  numba, llvmlite, scipy and scikit-learn for one resampling read;
* ``decord.VideoReader`` (``WanS2V.read_last_n_frames``, the pose video): decord has no wheels for
  current Pythons;
* ``torchvision.transforms`` ``Resize``, ``CenterCrop`` and ``ToTensor`` (S2V's reference image
  and pose frames) and ``transforms.functional.to_tensor`` (I2V-A14B's first frame), used only
  where torchvision cannot be imported: PyPI's torchvision is a CUDA build whose
  operator library does not load beside a CPU-only torch. A GPU image installs torchvision and
  the official code uses it.

Each is in ``sys.modules`` only while the official code imports (``while_importing``), for the
libraries that are not installed; what the official code bound stays bound, and nothing else in
the process sees a stand-in.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image

# --- librosa.load ------------------------------------------------------------------------------


def librosa_load(path: str, sr: int | None = 22050, mono: bool = True, **_: Any) -> tuple[Any, int]:
    """``librosa.load``: float32 samples (mono: 1-D) at ``sr``, through PyAV."""
    from worker.media import decode_audio

    samples, rate = decode_audio(Path(path).read_bytes(), sample_rate=sr, layout="mono" if mono else None)
    return (samples[0] if mono else samples), rate


def librosa_module() -> types.ModuleType:
    module = types.ModuleType("librosa", "librosa.load through PyAV (worker.adapters.wan_s2v.standins)")
    module.load = librosa_load  # type: ignore[attr-defined]
    return module


# --- decord.VideoReader ------------------------------------------------------------------------


class _Batch:
    def __init__(self, array: Any):
        self._array = array

    def asnumpy(self) -> Any:
        return self._array


class PyAVVideoReader:
    """The part of ``decord.VideoReader`` that ``WanS2V.read_last_n_frames`` uses."""

    def __init__(self, path: str, *_: Any, **__: Any):
        import numpy as np

        from worker.media import decode_video

        frames, self._fps = decode_video(Path(path).read_bytes())
        self._frames = np.stack([np.asarray(f.convert("RGB")) for f in frames])

    def get_avg_fps(self) -> float:
        return self._fps

    def __len__(self) -> int:
        return len(self._frames)

    def get_batch(self, indices: Any) -> _Batch:
        return _Batch(self._frames[list(indices)])


def decord_module() -> types.ModuleType:
    module = types.ModuleType("decord", "decord.VideoReader through PyAV (worker.adapters.wan_s2v.standins)")
    module.VideoReader = PyAVVideoReader  # type: ignore[attr-defined]
    return module


# --- torchvision.transforms --------------------------------------------------------------------


def _resized(height: int, width: int, size: int | tuple[int, int]) -> tuple[int, int]:
    """torchvision's output size: an int sets the shorter side and keeps the aspect ratio."""
    if not isinstance(size, int):
        return int(size[0]), int(size[1])
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


class Resize:
    """``transforms.Resize(size)``: bilinear, antialiased, on a PIL image or a ``[..., H, W]`` tensor."""

    def __init__(self, size: int | tuple[int, int], **_: Any):
        self.size = size

    def __call__(self, image: Any) -> Any:
        from PIL import Image

        if isinstance(image, Image.Image):
            height, width = _resized(image.height, image.width, self.size)
            return image.resize((width, height), Image.Resampling.BILINEAR)
        import torch.nn.functional as F

        height, width = _resized(image.shape[-2], image.shape[-1], self.size)
        batch = image.reshape(-1, *image.shape[-3:]) if image.ndim != 3 else image[None]
        out = F.interpolate(
            batch.float(), size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )
        return out.to(image.dtype).reshape(*image.shape[:-2], height, width)


class CenterCrop:
    """``transforms.CenterCrop((h, w))``: zero padding first where the image is smaller."""

    def __init__(self, size: int | tuple[int, int]):
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def __call__(self, image: Any) -> Any:
        from PIL import Image

        crop_h, crop_w = self.size
        if isinstance(image, Image.Image):
            return self._crop_pil(image, crop_h, crop_w)
        return self._crop_tensor(image, crop_h, crop_w)

    @staticmethod
    def _crop_pil(image: Image.Image, crop_h: int, crop_w: int) -> Image.Image:
        from PIL import Image

        width, height = image.size
        if crop_h > height or crop_w > width:
            canvas = Image.new(image.mode, (max(width, crop_w), max(height, crop_h)))
            canvas.paste(image, ((max(width, crop_w) - width) // 2, (max(height, crop_h) - height) // 2))
            image, (width, height) = canvas, canvas.size
        top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
        return image.crop((left, top, left + crop_w, top + crop_h))

    @staticmethod
    def _crop_tensor(image: torch.Tensor, crop_h: int, crop_w: int) -> torch.Tensor:
        import torch.nn.functional as F

        height, width = image.shape[-2:]
        if crop_h > height or crop_w > width:
            pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
            image = F.pad(image, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
            height, width = image.shape[-2:]
        top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
        return image[..., top : top + crop_h, left : left + crop_w]


class ToTensor:
    """``transforms.ToTensor()`` of a PIL image: float ``[C, H, W]`` in [0, 1]."""

    def __call__(self, picture: Any) -> torch.Tensor:
        import numpy as np
        import torch

        array = np.array(picture, dtype=np.uint8, copy=True)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array).permute(2, 0, 1).float().div(255)


def torchvision_modules() -> dict[str, types.ModuleType]:
    """``torchvision``, ``torchvision.transforms`` with the three transforms above, and
    ``torchvision.transforms.functional`` with ``to_tensor``."""
    package = types.ModuleType(
        "torchvision", "torchvision.transforms stand-in (worker.adapters.wan_s2v.standins)"
    )
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    transforms.Resize, transforms.CenterCrop, transforms.ToTensor = Resize, CenterCrop, ToTensor  # type: ignore[attr-defined]
    functional.to_tensor = ToTensor()  # type: ignore[attr-defined]
    transforms.functional = functional  # type: ignore[attr-defined]
    package.transforms = transforms  # type: ignore[attr-defined]
    return {
        "torchvision": package,
        "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
    }


def torchvision_importable() -> bool:
    """Whether the real torchvision imports (its compiled operators load beside this torch)."""
    if "torchvision" in sys.modules:
        return getattr(sys.modules["torchvision"], "__file__", None) is not None
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or RuntimeError from its operator registrations
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


# --- While the official code imports -----------------------------------------------------------


@contextlib.contextmanager
def while_importing() -> Iterator[None]:
    """The stand-ins in ``sys.modules`` for the libraries that are not installed; the modules
    there before are back after."""
    modules: dict[str, types.ModuleType] = {}
    if importlib.util.find_spec("librosa") is None:
        modules["librosa"] = librosa_module()
    if importlib.util.find_spec("decord") is None:
        modules["decord"] = decord_module()
    if not torchvision_importable():
        modules.update(torchvision_modules())
    with in_sys_modules(modules):
        yield


@contextlib.contextmanager
def in_sys_modules(modules: dict[str, types.ModuleType]) -> Iterator[None]:
    """``modules`` in ``sys.modules`` for the block; the modules there before are back after."""
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
