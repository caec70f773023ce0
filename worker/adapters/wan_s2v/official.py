"""The official modules of the group's tasks (S2V, T2V-A14B, I2V-A14B), imported without what
they do not use, and patched (``PATCHES``).

``import_wan_modules`` does it once per process, in this order:

1. the installed ``wan22`` must be ``WAN22_VERSION``, the code every table here was written
   against;
2. the modules the tasks use are imported, ``wan/__init__.py`` not run (it imports every task, and
   Animate needs opencv, peft, decord, sam2...). ``wan/modules/t5.py`` evaluates
   ``torch.cuda.current_device()`` as a default argument when it is imported, which raises on a
   CPU-only torch: it is imported with that call answering "cpu". The media libraries the
   official code imports and the tasks do not need (``standins``) are in ``sys.modules`` only
   while it imports;
3. every attribute that ``PATCHES`` or ``progress.patches`` replaces must exist, so a changed package fails here, at load, naming what it no longer has;
4. ``PATCHES`` are applied.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import sys
import threading
import types
import warnings
from collections.abc import Iterator

from worker.adapters.wan_s2v import progress, standins
from worker.adapters.wan_s2v.attention import flash_attn_available, sdpa_attention
from worker.adapters.wan_s2v.patch import OfficialCodeMismatch, Patch, apply, instead, missing

WAN22_VERSION = "2.2.11"
INSTALL = f"pip install --no-deps wan22=={WAN22_VERSION} (plus einops, easydict)"


def _sdpa_unless_flash_attn(module: str) -> Patch:
    return Patch(
        module,
        "flash_attention",
        instead(sdpa_attention),
        "flash-attn is not installed: PyTorch SDPA with flash-attn's varlen semantics",
        when=lambda: not flash_attn_available(),
    )


# What every device needs; progress.patches are applied while a job runs.
PATCHES = (
    # Each module binds flash_attention at import and calls it by that name.
    _sdpa_unless_flash_attn("wan.modules.attention"),
    _sdpa_unless_flash_attn("wan.modules.model"),
    _sdpa_unless_flash_attn("wan.modules.s2v.model_s2v"),
    _sdpa_unless_flash_attn("wan.modules.s2v.motioner"),
    _sdpa_unless_flash_attn("wan.distributed.ulysses"),
    Patch(
        "wan.modules.s2v.audio_encoder",
        "librosa",
        lambda _librosa: standins.librosa_module(),
        "AudioEncoder reads speech with librosa.load: PyAV instead",
    ),
    Patch(
        "wan.speech2video",
        "VideoReader",
        instead(standins.PyAVVideoReader),
        "WanS2V reads the pose video with decord.VideoReader: PyAV instead",
    ),
    *(
        Patch(
            module,
            "tqdm",
            instead(lambda iterable, *args, **kwargs: iterable),
            "no progress bars in the group log",
        )
        for module in progress.MODULES
    ),
)

_lock = threading.Lock()
_modules: dict[str, types.ModuleType] = {}


def check_version() -> None:
    """Refuse any ``wan22`` but the one the patches were written against."""
    try:
        found = importlib.metadata.version("wan22")
    except importlib.metadata.PackageNotFoundError:
        raise OfficialCodeMismatch(f"wan22 is not installed: {INSTALL}") from None
    if found != WAN22_VERSION:
        raise OfficialCodeMismatch(
            f"wan22 {found} is installed; the group's models patch wan22 {WAN22_VERSION}: {INSTALL}"
        )


def import_wan_modules() -> dict[str, types.ModuleType]:
    """The official modules the group's tasks use, patched, by short name: configs, t5, vae2_1,
    tokenizers, model, model_s2v, attention, audio_encoder, speech2video, text2video,
    image2video."""
    with _lock:
        if not _modules:
            check_version()
            found = _import()
            absent = missing(PATCHES + progress.patches(lambda: None))
            if absent:
                raise OfficialCodeMismatch(
                    f"wan22 {WAN22_VERSION} as installed has no {', '.join(absent)}, which the group's "
                    f"models replace: the package changed under its version (reinstall: {INSTALL})"
                )
            apply(PATCHES)
            _modules.update(found)
        return _modules


def _import() -> dict[str, types.ModuleType]:
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
        "model": importlib.import_module("wan.modules.model"),
        "model_s2v": importlib.import_module("wan.modules.s2v.model_s2v"),
        "attention": importlib.import_module("wan.modules.attention"),
    }
    importlib.import_module("wan.distributed.ulysses")
    with standins.while_importing():
        found["audio_encoder"] = importlib.import_module("wan.modules.s2v.audio_encoder")
        for module in progress.MODULES:  # the tasks: speech2video, text2video, image2video
            found[module.rpartition(".")[2]] = importlib.import_module(module)
    return found


def _package_without_init(name: str) -> None:
    """Register package ``name`` so its submodules import, without running its ``__init__``."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        raise OfficialCodeMismatch(f"{name} is not installed: {INSTALL}")
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
