"""Request schemas, one per task kind, and the one function that turns caller input into a request.

``parse_request`` is the only way in: the SDK, the CLI and the worker all call it, so what was
accepted at submit is exactly what runs. It checks, in order: the model exists, it does the task
kind, it is served, the fields are well formed (unknown fields refused), and the values fit the
model (size multiples, side and pixel limits, steps, prompt length). Defaults come from the
catalog and are written into the returned request, so a stored request is complete.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from routing.catalog import CATALOG, ModelSpec, TaskKind
from routing.errors import FieldError, InvalidRequest

Prompt = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


# Media fields that hold videos or audio; every other media field holds images.
VIDEO_FIELDS = frozenset({"pose_video", "face_video", "background_video", "mask_video"})
AUDIO_FIELDS = frozenset({"audio"})


class MediaRef(BaseModel):
    """Input media: an object already in the fleet's store (``key``, e.g. from an upload) or an
    http(s) ``url``. At submit a URL is fetched, checked and stored, and the queued request
    refers to it by key only: workers never reach out to the internet."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        # What the validator below enforces, said in the JSON schema too.
        json_schema_extra={"oneOf": [{"required": ["key"]}, {"required": ["url"]}]},
    )

    key: str | None = Field(default=None, min_length=1, max_length=1024)
    url: str | None = Field(default=None, min_length=1, max_length=4096, pattern=r"^[Hh][Tt][Tt][Pp][Ss]?://")

    @model_validator(mode="after")
    def _exactly_one(self) -> MediaRef:
        if (self.key is None) == (self.url is None):
            raise ValueError("give exactly one of key or url")
        if self.url is not None and not self.url.lower().startswith(("http://", "https://")):
            raise ValueError("url must be http or https")
        return self


class LoraRef(BaseModel):
    """A LoRA to apply for one job: ``source`` is a store key (from an upload), an https URL, or a
    hub id ``owner/repo/file.safetensors`` (only where the fleet allows hub LoRAs). At submit the
    file is read, checked and stored under ``loras/<sha256>.safetensors``; the queued request
    names it by that key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1, max_length=4096)
    scale: float = Field(default=1.0, ge=-4.0, le=4.0, strict=True)


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


class TextToImageRequest(RequestBase):
    kind: Literal[TaskKind.TEXT_TO_IMAGE] = TaskKind.TEXT_TO_IMAGE
    output_format: Literal["png"] = "png"


class EditRequest(RequestBase):
    """Edit one image (Qwen-Image-Edit) or compose one to three (Qwen-Image-Edit-2509: person +
    person, person + scene, person + object). Without width/height the output takes the aspect
    ratio of the last image at about one megapixel, as the pipelines do."""

    kind: Literal[TaskKind.EDIT] = TaskKind.EDIT
    images: list[MediaRef] = Field(min_length=1)
    output_format: Literal["png"] = "png"


class TextToVideoRequest(RequestBase):
    kind: Literal[TaskKind.TEXT_TO_VIDEO] = TaskKind.TEXT_TO_VIDEO
    frames: int | None = Field(default=None, ge=1, le=10_000, strict=True)


class ImageToVideoRequest(TextToVideoRequest):
    kind: Literal[TaskKind.IMAGE_TO_VIDEO] = TaskKind.IMAGE_TO_VIDEO  # type: ignore[assignment]
    image: MediaRef


class AnimateRequest(RequestBase):
    """Wan2.2-Animate. ``move``: the character in ``image`` performs the motion of the driving
    video. ``mix``: the character replaces the person in the video. The pose, face, background and
    mask videos are what Wan's preprocessing (pose estimation, face crops, segmentation) makes
    from the driving video; see the README."""

    kind: Literal[TaskKind.ANIMATE] = TaskKind.ANIMATE
    mode: Literal["move", "mix"]
    image: MediaRef
    pose_video: MediaRef
    face_video: MediaRef
    background_video: MediaRef | None = None
    mask_video: MediaRef | None = None
    frames: int | None = Field(default=None, ge=1, le=10_000, strict=True)

    @model_validator(mode="after")
    def _mix_needs_background_and_mask(self) -> AnimateRequest:
        missing = [name for name in ("background_video", "mask_video") if getattr(self, name) is None]
        if self.mode == "mix" and missing:
            raise PydanticCustomError(
                "mix_inputs", "required in mix mode: {missing}", {"missing": ", ".join(missing)}
            )
        return self


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


def parse_request(data: Mapping[str, Any] | RequestBase) -> GenerationRequest:
    """Validate caller input against the schema of its task kind and the model's limits.

    Raises ``InvalidRequest`` whose ``errors`` name every offending field.
    """
    if isinstance(data, RequestBase):
        data = data.model_dump(mode="json", exclude_none=True)
    if not isinstance(data, Mapping):
        raise InvalidRequest([FieldError("request", "must be an object")])
    data = dict(data)

    spec = _resolve_model(data)
    kind = _resolve_kind(data, spec)
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
        raise InvalidRequest([_field_error(e) for e in exc.errors()]) from None

    request = _with_defaults(request, spec)
    errors = _check_limits(request, spec)
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


def _field_error(error: Mapping[str, Any]) -> FieldError:
    field = ".".join(str(part) for part in error["loc"]) or "request"
    if error["type"] == "extra_forbidden":
        return FieldError(field, "unknown field")
    if error["type"] == "mix_inputs":
        # Name the first missing field rather than the request as a whole.
        return FieldError(error["ctx"]["missing"].split(", ")[0], error["msg"])
    message = error["msg"].removeprefix("Value error, ")
    return FieldError(field, message)


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
    return request.model_copy(update=update)


def _check_variant_and_loras(request: RequestBase, spec: ModelSpec) -> list[FieldError]:
    from routing.settings import get_settings

    errors: list[FieldError] = []
    if request.variant is not None and request.variant not in spec.variants:
        known = ", ".join(sorted(spec.variants)) or "none"
        errors.append(
            FieldError("variant", f"{spec.key} has no variant {request.variant!r}; its variants: {known}")
        )
    if request.loras:
        max_loras = get_settings().max_loras
        if spec.lora_modules is None:
            errors.append(FieldError("loras", f"{spec.key} takes no LoRAs: its runner cannot load them"))
        elif len(request.loras) > max_loras:
            errors.append(
                FieldError("loras", f"at most {max_loras} LoRAs a request (got {len(request.loras)})")
            )
    return errors


def _check_limits(request: RequestBase, spec: ModelSpec) -> list[FieldError]:
    errors: list[FieldError] = _check_variant_and_loras(request, spec)
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
