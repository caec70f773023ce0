"""Request schemas, one per task kind, and the one function that turns caller input into a request.

``parse_request`` is the only way in: the SDK, the CLI and the worker all call it, so what was
accepted at submit is exactly what runs. It checks, in order: the model exists, it does the task
kind, it is served, the fields are well formed (unknown fields refused), and the values fit the
model (size multiples, side and pixel limits, steps, prompt length) and the ``RequestLimits``
it is given (never the process's settings: a worker checks a stored request under the limits it
was accepted under). Defaults come from the catalog and are written into the returned request, so
a stored request is complete.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from routing.catalog import CATALOG, ModelSpec, TaskKind
from routing.errors import FieldError, InvalidRequest, field_error
from routing.limits import DEFAULT_LIMITS, RequestLimits

Prompt = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


# Media fields that hold videos or audio; every other media field holds images.
VIDEO_FIELDS = frozenset({"video", "pose_video", "face_video", "background_video", "mask_video"})
AUDIO_FIELDS = frozenset({"audio"})


# The longest store key a request may name (S3's own limit is 1,024 bytes).
MAX_KEY_CHARS = 1024


class MediaRef(BaseModel):
    """Input media: an object already in the fleet's store (``key``, e.g. from an upload), an
    http(s) ``url``, or the file itself as a base64 data URL (``data:image/png;base64,...``,
    RFC 2397). At submit a URL is fetched (a data URL decoded), checked and stored under the job's
    ``inputs/`` folder, and the queued request refers to it by key only: workers never reach out
    to the internet."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        # What the validator below enforces, said in the JSON schema too.
        json_schema_extra={"oneOf": [{"required": ["key"]}, {"required": ["url"]}]},
    )

    key: str | None = Field(default=None, min_length=1, max_length=MAX_KEY_CHARS)
    url: str | None = Field(
        default=None,
        min_length=1,
        pattern=r"^([Hh][Tt][Tt][Pp][Ss]?://|[Dd][Aa][Tt][Aa]:)",
        description="an http(s) URL of at most FLEET_MAX_URL_CHARS (4096) characters, or a base64 data URL "
        "(its file at most FLEET_MAX_INPUT_BYTES)",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> MediaRef:
        if (self.key is None) == (self.url is None):
            raise ValueError("give exactly one of key or url")
        if self.url is not None:
            if is_data_url(self.url):
                return self
            if not self.url.lower().startswith(("http://", "https://")):
                raise ValueError("url must be http(s) or a data URL")
        return self


def is_data_url(url: str) -> bool:
    """Whether ``url`` is a data URL (the media inline), not one to fetch."""
    return url[:5].lower() == "data:"


def data_url(data: bytes) -> str:
    """``data`` as a base64 data URL, a request's media ``url`` (its type is told from its bytes)."""
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


class FirstBlockCache(BaseModel):
    """First-block cache: every step runs the first transformer block; when its output changed
    less than ``threshold`` (relative mean absolute difference) since the last full step, the
    other blocks are skipped and their cached residual is reused. Higher skips more."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["first_block"]
    threshold: float = Field(default=0.1, gt=0.0, le=1.0, strict=True)


class TaylorSeerCache(BaseModel):
    """TaylorSeer: after ``warmup_steps`` full steps, each transformer block runs in full only
    every ``interval`` steps; in between its output is predicted by a first-order Taylor
    expansion of its recent outputs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["taylorseer"]
    interval: int = Field(default=5, ge=2, le=10, strict=True)
    warmup_steps: int = Field(default=3, ge=1, le=20, strict=True)


CacheRequest = Annotated[FirstBlockCache | TaylorSeerCache, Field(discriminator="method")]

# Lossy formats' quality (Pillow's 1-100 scale) when the request gives none.
IMAGE_QUALITY_DEFAULTS = {"webp": 90, "jpeg": 90}


class LoraRef(BaseModel):
    """A LoRA to apply for one job: ``source`` is a store key (from an upload), an https URL, or a
    hub id ``owner/repo/file.safetensors`` (only where the fleet allows hub LoRAs). At submit the
    file is read, checked and stored under ``loras/<tenant>/<sha256>.safetensors``; the queued request
    names it by that key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1)  # a URL is held to FLEET_MAX_URL_CHARS when fetched
    scale: float = Field(default=1.0, ge=-4.0, le=4.0, strict=True)
    # Which expert of a two-expert model (Wan2.2-A14B) it goes on: the high-noise one (the
    # early steps), the low-noise one (the late steps), or both. Other models: both.
    expert: Literal["high", "low", "both"] = "both"


class RequestBase(BaseModel):
    # Numbers are strict (no true for 1, no "512" for 512): a JSON client that sends the wrong
    # type has a bug worth hearing about.
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    kind: TaskKind
    prompt: Prompt
    negative_prompt: str | None = None
    width: int | None = Field(default=None, ge=1, le=16384, strict=True)
    height: int | None = Field(default=None, ge=1, le=16384, strict=True)
    steps: int | None = Field(default=None, ge=1, le=10_000, strict=True)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=30.0, strict=True)
    seed: int | None = Field(default=None, ge=0, lt=2**63, strict=True)
    # Step caching, off unless asked for: it trades some quality for speed (see the README).
    cache: CacheRequest | None = None
    # A step-distilled variant of the model (the catalog's ``variants``), and LoRAs for this job.
    variant: str | None = Field(default=None, min_length=1, max_length=64)
    loras: list[LoraRef] | None = None

    def media_fields(self) -> dict[str, MediaRef | list[MediaRef]]:
        """The request's input media by field name (images come as a list)."""
        found: dict[str, MediaRef | list[MediaRef]] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, MediaRef) or (
                isinstance(value, list) and value and isinstance(value[0], MediaRef)
            ):
                found[name] = value
        return found


class ImageOutputFields(BaseModel):
    """How output images are encoded. ``output_quality`` is for the lossy formats (default
    ``IMAGE_QUALITY_DEFAULTS``); PNG is lossless and takes none."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output_format: Literal["png", "webp", "jpeg"] = "png"
    output_quality: int | None = Field(default=None, ge=1, le=100, strict=True)


class VideoOutputFields(BaseModel):
    """How output videos are encoded: H.264 MP4 at ``video_crf`` (x264's constant rate factor:
    0 lossless, 51 worst; 18 is visually near lossless)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output_format: Literal["mp4"] = "mp4"
    video_crf: int = Field(default=18, ge=0, le=51, strict=True)


class GuidanceOptions(BaseModel):
    """The Z-Image pipelines' classifier-free guidance options, for the models that take them
    (the catalog's ``cfg_options``; refused on the others). ``cfg_normalization``: each step's
    guided prediction is scaled down to no longer than the prompt's own; ``cfg_truncation``:
    guidance stops once this share of the denoising is done (1.0: never)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cfg_normalization: bool | None = Field(default=None, strict=True)
    cfg_truncation: float | None = Field(default=None, ge=0.0, le=1.0, strict=True)


# The pipelines' own defaults, written into requests for the models that take the options.
GUIDANCE_OPTION_DEFAULTS = {"cfg_normalization": False, "cfg_truncation": 1.0}


class TextToImageRequest(RequestBase, ImageOutputFields, GuidanceOptions):
    """``num_outputs`` images from one prompt; output i has seed ``seed + i``, and a job of one
    output with that seed makes the same image."""

    kind: Literal[TaskKind.TEXT_TO_IMAGE] = TaskKind.TEXT_TO_IMAGE
    num_outputs: int = Field(
        default=1,
        ge=1,
        strict=True,
        description="images to make, at most the fleet's FLEET_MAX_NUM_OUTPUTS (4)",
    )


class EditRequest(RequestBase, ImageOutputFields, GuidanceOptions):
    """Edit one image (Qwen-Image-Edit) or compose one to three (Qwen-Image-Edit-2509: person +
    person, person + scene, person + object; Z-Image-Omni-Base: up to four). Without
    width/height the output takes the aspect ratio of the last image at about one megapixel, as
    the pipelines do."""

    kind: Literal[TaskKind.EDIT] = TaskKind.EDIT
    images: list[MediaRef] = Field(min_length=1)


class TextToVideoRequest(RequestBase, VideoOutputFields):
    kind: Literal[TaskKind.TEXT_TO_VIDEO] = TaskKind.TEXT_TO_VIDEO
    frames: int | None = Field(default=None, ge=1, le=10_000, strict=True)
    # A two-expert model's (Wan2.2-A14B) guidance for its low-noise expert; ``guidance_scale``
    # is then the high-noise expert's. Refused for other models.
    guidance_scale_2: float | None = Field(default=None, ge=0.0, le=30.0, strict=True)


class ImageToVideoRequest(TextToVideoRequest):
    kind: Literal[TaskKind.IMAGE_TO_VIDEO] = TaskKind.IMAGE_TO_VIDEO  # type: ignore[assignment]
    image: MediaRef


class AnimateRequest(RequestBase, VideoOutputFields):
    """Wan2.2-Animate. ``move``: the character in ``image`` performs the motion of the driving
    video. ``mix``: the character replaces the person in the video.

    A request comes in one of two forms. From a photo and a video: ``image`` and ``video`` (the
    driving video in move mode, the scene in mix mode), and in move mode optionally ``retarget``
    (the pose fitted to the character's proportions); the worker runs Wan's preprocessing (pose
    estimation, face crops, segmentation) on them. Precomputed: ``image`` with the pose and face
    videos, and in mix mode the background and mask videos, that preprocessing made elsewhere.
    A request giving parts of both forms is refused, naming the fields. See the README."""

    kind: Literal[TaskKind.ANIMATE] = TaskKind.ANIMATE
    mode: Literal["move", "mix"]
    image: MediaRef
    video: MediaRef | None = None
    retarget: bool | None = Field(default=None, strict=True)
    pose_video: MediaRef | None = None
    face_video: MediaRef | None = None
    background_video: MediaRef | None = None
    mask_video: MediaRef | None = None
    frames: int | None = Field(default=None, ge=1, le=10_000, strict=True)

    @property
    def precomputed(self) -> bool:
        """Whether the request brings preprocessing's outputs rather than a video to run it on."""
        return self.video is None

    @model_validator(mode="after")
    def _one_form(self) -> AnimateRequest:
        precomputed = [name for name in ANIMATE_PRECOMPUTED_FIELDS if getattr(self, name) is not None]
        if self.video is not None:
            if precomputed:
                raise PydanticCustomError(
                    "animate_form",
                    "give video, or the precomputed {fields}, not both",
                    {"fields": ", ".join(precomputed), "field": precomputed[0]},
                )
            if self.retarget is not None and self.mode != "move":
                raise PydanticCustomError(
                    "animate_form", "retarget is for move mode only", {"field": "retarget"}
                )
            return self
        if self.retarget is not None:
            raise PydanticCustomError(
                "animate_form",
                "retarget needs video: precomputed pose videos are used as they are",
                {"field": "retarget"},
            )
        needed = ["pose_video", "face_video"]
        if self.mode == "mix":
            needed += ["background_video", "mask_video"]
        missing = [name for name in needed if getattr(self, name) is None]
        if missing and not precomputed:
            raise PydanticCustomError(
                "animate_form",
                "required: video (with image), or the precomputed {missing}",
                {"missing": ", ".join(needed), "field": "video"},
            )
        if missing:
            raise PydanticCustomError(
                "animate_form",
                "required in {mode} mode with precomputed inputs: {missing}",
                {"mode": self.mode, "missing": ", ".join(missing), "field": missing[0]},
            )
        return self


# What Wan-Animate's preprocessing makes from a video: the animate request's precomputed form.
ANIMATE_PRECOMPUTED_FIELDS = ("pose_video", "face_video", "background_video", "mask_video")


class SpeechToVideoRequest(RequestBase):
    """Wan2.2-S2V: a reference image speaks (and sings) the ``audio``. The speech drives lips,
    expression and head motion first; an optional ``pose_video`` drives body pose; the prompt
    sets scene, style and camera, and cannot override what the speech and pose decide. The
    video is made in clips of 80 frames at 16 fps; ``clips`` caps how many (default: as many
    as the speech needs)."""

    kind: Literal[TaskKind.SPEECH_TO_VIDEO] = TaskKind.SPEECH_TO_VIDEO
    image: MediaRef
    audio: MediaRef
    pose_video: MediaRef | None = None
    clips: int | None = Field(default=None, ge=1, le=100, strict=True)


GenerationRequest = (
    TextToImageRequest
    | EditRequest
    | TextToVideoRequest
    | ImageToVideoRequest
    | AnimateRequest
    | SpeechToVideoRequest
)

REQUEST_TYPES: dict[TaskKind, type[RequestBase]] = {
    TaskKind.TEXT_TO_IMAGE: TextToImageRequest,
    TaskKind.EDIT: EditRequest,
    TaskKind.TEXT_TO_VIDEO: TextToVideoRequest,
    TaskKind.IMAGE_TO_VIDEO: ImageToVideoRequest,
    TaskKind.ANIMATE: AnimateRequest,
    TaskKind.SPEECH_TO_VIDEO: SpeechToVideoRequest,
}


def parse_request(
    data: Mapping[str, Any] | RequestBase, *, limits: RequestLimits = DEFAULT_LIMITS
) -> GenerationRequest:
    """Validate caller input against the schema of its task kind, the model's limits and
    ``limits`` (default: the settings' defaults; a fleet passes ``RequestLimits.from_settings``).

    Raises ``InvalidRequest`` whose ``errors`` name every offending field.
    """
    if isinstance(data, RequestBase):
        data = data.model_dump(mode="json", exclude_none=True)
    if not isinstance(data, Mapping):
        raise InvalidRequest([FieldError("request", "must be an object")])
    data = dict(data)

    spec = _resolve_model(data)
    kind = _resolve_kind(data, spec)
    if not spec.released:
        raise InvalidRequest(
            [
                FieldError(
                    "model",
                    f"{spec.key} has not been released yet: it is listed so callers can plan, "
                    "and is served once its makers publish it",
                )
            ]
        )
    if not spec.served:
        raise InvalidRequest(
            [FieldError("model", f"{spec.key} is in the catalog but not served yet: no worker runs it")]
        )
    request_type = REQUEST_TYPES.get(kind)
    if request_type is None:
        raise InvalidRequest([FieldError("kind", f"{kind.value} requests are not accepted yet")])

    try:
        request = request_type.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest([field_error(e) for e in exc.errors()]) from None

    request = _with_defaults(request, spec)
    errors = _check_limits(request, spec, limits)
    errors += _check_outputs(request, spec, limits.max_num_outputs)
    if errors:
        raise InvalidRequest(errors)
    return request


def _resolve_model(data: dict[str, Any]) -> ModelSpec:
    key = data.get("model")
    if key is None:
        raise InvalidRequest([FieldError("model", "required")])
    if not isinstance(key, str) or key not in CATALOG:
        known = ", ".join(sorted(CATALOG))
        raise InvalidRequest([FieldError("model", f"unknown model {key!r}; known models: {known}")])
    return CATALOG[key]


def _resolve_kind(data: dict[str, Any], spec: ModelSpec) -> TaskKind:
    does = ", ".join(k.value for k in spec.task_kinds)
    raw = data.get("kind")
    if raw is None:
        if len(spec.task_kinds) != 1:
            raise InvalidRequest([FieldError("kind", f"required for {spec.key}; one of: {does}")])
        data["kind"] = spec.task_kinds[0].value
        return spec.task_kinds[0]
    try:
        kind = TaskKind(raw)
    except ValueError:
        known = ", ".join(k.value for k in TaskKind)
        raise InvalidRequest(
            [FieldError("kind", f"unknown task kind {raw!r}; known kinds: {known}")]
        ) from None
    if kind not in spec.task_kinds:
        raise InvalidRequest([FieldError("kind", f"{spec.key} does not do {kind.value}; it does: {does}")])
    return kind


def _with_defaults(request: RequestBase, spec: ModelSpec) -> RequestBase:
    # A variant runs with the steps and guidance it was distilled for, unless the caller says.
    variant = spec.variants.get(request.variant) if request.variant else None
    steps = variant.steps if variant else spec.default_steps
    guidance = variant.guidance if variant else spec.default_guidance
    update: dict[str, Any] = {
        "steps": request.steps or steps,
        "guidance_scale": guidance if request.guidance_scale is None else request.guidance_scale,
    }
    # An edit without a size follows its input image; every other kind has the model's default.
    if not isinstance(request, EditRequest):
        update["width"] = request.width or spec.size.default_width
        update["height"] = request.height or spec.size.default_height
    # Animate without a count follows its driving video (the worker knows its length).
    if isinstance(request, TextToVideoRequest) and spec.video is not None:
        update["frames"] = request.frames or spec.video.default_frames
    if isinstance(request, TextToVideoRequest) and spec.boundary_ratio is not None:
        guidance_2 = variant.guidance if variant else spec.default_guidance_2
        update["guidance_scale_2"] = (
            guidance_2 if request.guidance_scale_2 is None else request.guidance_scale_2
        )
    if isinstance(request, ImageOutputFields) and request.output_quality is None:
        update["output_quality"] = IMAGE_QUALITY_DEFAULTS.get(request.output_format)
    if isinstance(request, GuidanceOptions) and spec.cfg_options:
        update |= {
            name: value for name, value in GUIDANCE_OPTION_DEFAULTS.items() if getattr(request, name) is None
        }
    return request.model_copy(update=update)


def _check_outputs(request: RequestBase, spec: ModelSpec, max_num_outputs: int) -> list[FieldError]:
    errors: list[FieldError] = []
    num_outputs = getattr(request, "num_outputs", 1)
    if num_outputs > max_num_outputs:
        errors.append(FieldError("num_outputs", f"must be at most {max_num_outputs} (got {num_outputs})"))
    if isinstance(request, ImageOutputFields) and request.output_format == "png":
        if request.output_quality is not None:
            errors.append(
                FieldError("output_quality", "png is lossless: give a quality only with webp or jpeg")
            )
    if isinstance(request, GuidanceOptions) and not spec.cfg_options:
        takers = ", ".join(key for key, other in CATALOG.items() if other.cfg_options and other.served)
        for name in GUIDANCE_OPTION_DEFAULTS:
            if getattr(request, name) is not None:
                errors.append(FieldError(name, f"{spec.key} does not take {name}; models that do: {takers}"))
    if request.cache is not None and request.cache.method not in spec.cache_methods:
        supported = ", ".join(spec.cache_methods) or "none"
        errors.append(
            FieldError(
                "cache.method",
                f"{spec.key} does not support {request.cache.method} caching; supported: {supported}",
            )
        )
    return errors


def _check_variant_and_loras(request: RequestBase, spec: ModelSpec, max_loras: int) -> list[FieldError]:
    errors: list[FieldError] = []
    if request.variant is not None and request.variant not in spec.variants:
        known = ", ".join(sorted(spec.variants)) or "none"
        errors.append(
            FieldError("variant", f"{spec.key} has no variant {request.variant!r}; its variants: {known}")
        )
    variant = spec.variants.get(request.variant) if request.variant else None
    if variant is not None and variant.dmd_timesteps and request.steps not in (None, variant.steps):
        errors.append(
            FieldError(
                "steps",
                f"variant {variant.key} of {spec.key} runs exactly {variant.steps} steps, at the timesteps "
                f"it was distilled for ({', '.join(map(str, variant.dmd_timesteps))}); got {request.steps}",
            )
        )
    if request.loras:
        if spec.lora_modules is None:
            errors.append(FieldError("loras", f"{spec.key} takes no LoRAs: its runner cannot load them"))
        elif len(request.loras) > max_loras:
            errors.append(
                FieldError("loras", f"at most {max_loras} LoRAs a request (got {len(request.loras)})")
            )
        if spec.boundary_ratio is None:
            for i, lora in enumerate(request.loras):
                if lora.expert != "both":
                    errors.append(
                        FieldError(
                            f"loras.{i}.expert",
                            f"{spec.key} has one transformer: expert {lora.expert!r} is for the "
                            f"two-expert models ({_two_expert_models()})",
                        )
                    )
    if getattr(request, "guidance_scale_2", None) is not None and spec.boundary_ratio is None:
        errors.append(
            FieldError("guidance_scale_2", f"{spec.key} has one transformer: give only guidance_scale")
        )
    elif getattr(request, "guidance_scale_2", None) is not None and request.guidance_scale_2 > 1.0 >= (
        request.guidance_scale
    ):
        # The pipelines run classifier-free guidance for both experts or for neither, by
        # ``guidance_scale``: a low-noise guidance alone would silently not apply.
        errors.append(
            FieldError(
                "guidance_scale_2", "guidance above 1 for the low-noise expert needs guidance_scale above 1"
            )
        )
    return errors


def _two_expert_models() -> str:
    return ", ".join(key for key, spec in CATALOG.items() if spec.boundary_ratio is not None)


def _check_limits(request: RequestBase, spec: ModelSpec, limits: RequestLimits) -> list[FieldError]:
    errors: list[FieldError] = _check_variant_and_loras(request, spec, limits.max_loras)
    size = spec.size
    if request.width is not None and request.height is not None:
        for name in ("width", "height"):
            value = getattr(request, name)
            if value % size.multiple_of:
                errors.append(
                    FieldError(name, f"must be a multiple of {size.multiple_of} for {spec.key} (got {value})")
                )
            elif not size.min_side <= value <= size.max_side:
                errors.append(
                    FieldError(
                        name,
                        f"must be between {size.min_side} and {size.max_side} for {spec.key} (got {value})",
                    )
                )
        if not errors and request.width * request.height > size.max_pixels:
            errors.append(
                FieldError("width", f"width x height must be at most {size.max_pixels} pixels for {spec.key}")
            )
    elif (request.width is None) != (request.height is None):
        missing = "height" if request.height is None else "width"
        errors.append(FieldError(missing, "give both width and height, or neither"))
    if request.steps > spec.max_steps:
        errors.append(
            FieldError("steps", f"must be at most {spec.max_steps} for {spec.key} (got {request.steps})")
        )
    for name in ("prompt", "negative_prompt"):
        text = getattr(request, name)
        if text and len(text) > spec.max_prompt_chars:
            errors.append(
                FieldError(name, f"must be at most {spec.max_prompt_chars} characters for {spec.key}")
            )
    if isinstance(request, EditRequest) and len(request.images) > spec.max_input_images:
        errors.append(
            FieldError(
                "images",
                f"{spec.key} takes at most {spec.max_input_images} images (got {len(request.images)})",
            )
        )
    allowed = spec.allowed_sizes
    if allowed and request.width is not None and (request.width, request.height) not in allowed:
        sizes = ", ".join(f"{w}*{h}" for w, h in allowed)
        errors.append(FieldError("width", f"{spec.key} makes only these sizes (width*height): {sizes}"))
    clips = getattr(request, "clips", None)
    if (
        clips is not None
        and spec.video is not None
        and clips * spec.video.frames_step > spec.video.max_frames
    ):
        errors.append(
            FieldError("clips", f"at most {spec.video.max_frames // spec.video.frames_step} for {spec.key}")
        )
    frames = getattr(request, "frames", None)
    if frames is not None and spec.video is not None:
        video = spec.video
        if (frames - video.frames_offset) % video.frames_step or frames < video.frames_offset:
            form = (
                f"{video.frames_step}k+{video.frames_offset}"
                if video.frames_offset
                else f"a multiple of {video.frames_step}"
            )
            errors.append(FieldError("frames", f"must be {form} for {spec.key} (got {frames})"))
        elif frames > video.max_frames:
            errors.append(
                FieldError("frames", f"must be at most {video.max_frames} for {spec.key} (got {frames})")
            )
    return errors
