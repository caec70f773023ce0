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

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from routing.catalog import CATALOG, ModelSpec, TaskKind
from routing.errors import FieldError, InvalidRequest

Prompt = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class RequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    kind: TaskKind
    prompt: Prompt
    seed: int | None = Field(default=None, ge=0, lt=2**63)


class TextToImageRequest(RequestBase):
    kind: Literal[TaskKind.TEXT_TO_IMAGE] = TaskKind.TEXT_TO_IMAGE
    negative_prompt: str | None = None
    width: int | None = Field(default=None, ge=1, le=16384)
    height: int | None = Field(default=None, ge=1, le=16384)
    steps: int | None = Field(default=None, ge=1, le=10_000)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=30.0)
    output_format: Literal["png"] = "png"


GenerationRequest = TextToImageRequest

REQUEST_TYPES: dict[TaskKind, type[RequestBase]] = {
    TaskKind.TEXT_TO_IMAGE: TextToImageRequest,
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
    return FieldError(field, error["msg"])


def _with_defaults(request: TextToImageRequest, spec: ModelSpec) -> TextToImageRequest:
    return request.model_copy(
        update={
            "width": request.width or spec.size.default_width,
            "height": request.height or spec.size.default_height,
            "steps": request.steps or spec.default_steps,
            "guidance_scale": spec.default_guidance
            if request.guidance_scale is None
            else request.guidance_scale,
        }
    )


def _check_limits(request: TextToImageRequest, spec: ModelSpec) -> list[FieldError]:
    errors: list[FieldError] = []
    size = spec.size
    for name in ("width", "height"):
        value = getattr(request, name)
        if value % size.multiple_of:
            errors.append(
                FieldError(name, f"must be a multiple of {size.multiple_of} for {spec.key} (got {value})")
            )
        elif not size.min_side <= value <= size.max_side:
            errors.append(
                FieldError(
                    name, f"must be between {size.min_side} and {size.max_side} for {spec.key} (got {value})"
                )
            )
    if not errors and request.width * request.height > size.max_pixels:
        errors.append(
            FieldError("width", f"width x height must be at most {size.max_pixels} pixels for {spec.key}")
        )
    if request.steps > spec.max_steps:
        errors.append(
            FieldError("steps", f"must be at most {spec.max_steps} for {spec.key} (got {request.steps})")
        )
    if len(request.prompt) > spec.max_prompt_chars:
        errors.append(
            FieldError("prompt", f"must be at most {spec.max_prompt_chars} characters for {spec.key}")
        )
    if request.negative_prompt and len(request.negative_prompt) > spec.max_prompt_chars:
        errors.append(
            FieldError(
                "negative_prompt", f"must be at most {spec.max_prompt_chars} characters for {spec.key}"
            )
        )
    return errors
