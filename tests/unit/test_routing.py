"""Classes, queues, the catalog and the routing decision."""

from __future__ import annotations

import types

import pytest
from pydantic import ValidationError

from routing import memory
from routing.catalog import CATALOG, TaskKind, footprint_gb, get_model
from routing.celery_config import celery_settings, make_celery, webhook_transport_options
from routing.classes import Priority, VramClass, bigger_classes, consumed_queues, parse_queue, queue_name
from routing.decision import escalate, route
from routing.errors import InvalidRequest
from routing.memory import Mode, Placement, Work, largest_request, placement, predict
from routing.schemas import parse_request
from routing.settings import Settings


def test_each_class_consumes_its_own_queues_first_then_smaller_ones_biggest_first():
    assert consumed_queues(VramClass.GPU16) == ["gpu16.high", "gpu16", "gpu16.low"]
    assert consumed_queues(VramClass.GPU80) == [
        "gpu80.high",
        "gpu80",
        "gpu80.low",
        "gpu16.high",
        "gpu16",
        "gpu16.low",
    ]
    assert consumed_queues(VramClass.H100X8)[:3] == ["h100x8.high", "h100x8", "h100x8.low"]
    assert consumed_queues(VramClass.H100X8)[3:] == consumed_queues(VramClass.GPU80)


def test_every_queue_name_parses_back_to_its_class_and_priority():
    for vram_class in VramClass:
        for priority in Priority:
            assert parse_queue(queue_name(vram_class, priority)) == (vram_class, priority)
    assert parse_queue("gpu80.low") == (VramClass.GPU80, Priority.LOW)


@pytest.mark.parametrize("name", ["webhooks", "gpu16.normal", "gpu16.urgent", "gpu32", ""])
def test_a_name_that_is_no_gpu_queue_does_not_parse(name):
    with pytest.raises(ValueError):
        parse_queue(name)


def test_a_worker_app_declares_its_queues_in_preference_order():
    app = make_celery(Settings(), VramClass.GPU80)
    assert [q.name for q in app.conf.task_queues] == consumed_queues(VramClass.GPU80)
    # Kombu's "priority" cycle polls queues in declared order instead of rotating them.
    assert app.conf.broker_transport_options["queue_order_strategy"] == "priority"


def test_escalation_goes_one_class_up_and_stops_at_the_top():
    assert bigger_classes(VramClass.GPU16) == [VramClass.GPU80, VramClass.H100X8]
    assert escalate(VramClass.GPU16).vram_class is VramClass.GPU80
    assert escalate(VramClass.GPU80).vram_class is VramClass.H100X8
    assert escalate(VramClass.H100X8) is None


def test_catalog_holds_the_twelve_models_with_their_classes():
    expected = {
        "z-image-turbo": VramClass.GPU16,
        "z-image": VramClass.GPU16,
        "z-image-omni-base": VramClass.GPU16,
        "z-image-edit": VramClass.GPU16,
        "qwen-image": VramClass.GPU80,
        "qwen-image-edit": VramClass.GPU80,
        "qwen-image-edit-2509": VramClass.GPU80,
        "wan2.2-ti2v-5b": VramClass.GPU16,
        "wan2.2-t2v-a14b": VramClass.GPU80,
        "wan2.2-i2v-a14b": VramClass.GPU80,
        "wan2.2-animate-14b": VramClass.GPU80,
        "wan2.2-s2v-14b": VramClass.H100X8,
    }
    assert {key: spec.vram_class for key, spec in CATALOG.items()} == expected
    assert get_model("qwen-image-edit-2509").max_input_images == 3
    assert set(get_model("wan2.2-ti2v-5b").task_kinds) == {TaskKind.TEXT_TO_VIDEO, TaskKind.IMAGE_TO_VIDEO}
    for spec in CATALOG.values():
        size = spec.size
        assert size.default_width % size.multiple_of == 0 and size.default_height % size.multiple_of == 0, (
            spec.key
        )
        assert size.min_side <= min(size.default_width, size.default_height), spec.key
        assert 1 <= spec.default_steps <= spec.max_steps, spec.key
        if spec.video is not None:
            video = spec.video
            assert (video.default_frames - video.frames_offset) % video.frames_step == 0, spec.key
            assert (video.max_frames - video.frames_offset) % video.frames_step == 0, spec.key
        # A served model has memory data; an unreleased one is placed but never routed.
        assert (footprint_gb(spec, spec.vram_class) is not None) is spec.served, spec.key


def test_unknown_model_lookup_names_the_known_ones():
    with pytest.raises(KeyError, match="z-image-turbo"):
        get_model("nope")


def test_z_image_routes_to_the_16gb_queue():
    decision = route(parse_request({"model": "z-image-turbo", "prompt": "x"}))
    assert decision.vram_class is VramClass.GPU16 and decision.queue == "gpu16"


def test_z_image_with_guidance_outgrows_the_16gb_class_sooner_than_turbo():
    # Guidance (on by default) batches two passes a step: the largest square gpu16 takes is
    # smaller than Turbo's, and one multiple above it goes to gpu80.
    for model, extra in (("z-image", {}), ("z-image-omni-base", {"kind": "text-to-image"})):
        edge = largest_request(get_model(model), VramClass.GPU16).work
        assert edge is not None and edge.guidance, model
        side = edge.width if model == "z-image" else 1024
        at_edge = route(parse_request({"model": model, "prompt": "x", "width": side, "height": side} | extra))
        above = {"model": model, "prompt": "x", "width": 2048, "height": 2048} | extra
        assert (at_edge.queue, route(parse_request(above)).queue) == ("gpu16", "gpu80"), model
        unguided = route(parse_request(above | {"guidance_scale": 0.0}))
        assert unguided.queue == "gpu16", model
    z = largest_request(get_model("z-image"), VramClass.GPU16).work
    assert z is not None
    above = {"model": "z-image", "prompt": "x", "width": z.width + 16, "height": z.height}
    assert route(parse_request(above)).queue == "gpu80"
    # Both classes that run them have Turbo's speed profile: eager where offloaded (gpu16),
    # compiled and warmed at its sizes on gpu80; and Turbo's placements.
    for model in ("z-image", "z-image-omni-base"):
        assert CATALOG[model].speed == CATALOG["z-image-turbo"].speed, model
        assert CATALOG[model].placements == CATALOG["z-image-turbo"].placements, model
    # Turbo runs without guidance: the 16 GB class takes all it allows.
    turbo = route(parse_request({"model": "z-image-turbo", "prompt": "x", "width": 2048, "height": 2048}))
    assert turbo.queue == "gpu16"


def test_each_omni_base_input_image_counts_in_the_predicted_peak():
    # Each image joins every pass with its latent and SigLIP2 tokens (at most one megapixel's).
    spec = get_model("z-image-omni-base")
    peaks = [predict(spec, VramClass.GPU16, Work(1024, 1024, 0, True, n)) for n in range(5)]
    assert all(p is not None for p in peaks)
    values = [p.peak_gib for p in peaks if p is not None]
    assert values == sorted(values) and len(set(values)) == 5
    images = [{"key": f"uploads/{i}.png"} for i in range(4)]
    edit = {"model": "z-image-omni-base", "kind": "edit", "prompt": "x", "width": 1024, "height": 1024}
    queues = [route(parse_request(edit | {"images": images[:n]})).queue for n in (1, 2, 4)]
    assert queues == ["gpu16", "gpu80", "gpu80"]


def test_celery_settings_for_long_gpu_jobs():
    settings = Settings(max_wait_s=3600, max_run_s=1800)
    conf = celery_settings(settings)
    assert conf["accept_content"] == ["json"] and conf["task_serializer"] == "json"
    assert conf["task_acks_late"] is True and conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    # Short: a copy of a running job's message is dropped by the claim check (tests/faults), and a
    # message a dead worker held comes back within minutes.
    assert conf["broker_transport_options"]["visibility_timeout"] == settings.visibility_timeout_s == 600
    assert conf["task_time_limit"] == 1800
    # No result is kept for any task: nothing reads one (Flower takes states from events).
    assert conf["task_ignore_result"] is True and conf["result_backend"] == "disabled"


def test_webhook_retry_waits_end_before_the_webhook_queue_hands_out_a_copy(monkeypatch):
    # The longest retry wait plus one delivery must stay below the visibility timeout of the
    # webhook queue, which its workers take from the settings.
    edge = {"webhook_timeout_s": 15, "webhook_visibility_timeout_s": 900}
    with pytest.raises(ValidationError, match="must be below webhook_visibility_timeout_s"):
        Settings(webhook_retry_cap_s=885, **edge)
    settings = Settings(webhook_retry_cap_s=884.5, **edge)
    assert webhook_transport_options(settings)["visibility_timeout"] == 900
    assert webhook_transport_options(Settings())["visibility_timeout"] == 1800

    # A worker loading its settings from the environment refuses to start.
    monkeypatch.setenv("FLEET_WEBHOOK_RETRY_CAP_S", "3600")
    with pytest.raises(ValidationError, match="lower the cap or raise the visibility timeout"):
        Settings()
    monkeypatch.setenv("FLEET_WEBHOOK_VISIBILITY_TIMEOUT_S", "3616")
    assert Settings().webhook_visibility_timeout_s == 3616


def test_the_queue_message_is_the_one_celery_builds():
    import base64
    import json

    from routing.jobs.messages import TaskMessages

    app = make_celery(Settings())
    job_id = "ab" * 16
    queue, payload = TaskMessages(app).run_job(job_id, "gpu80")
    envelope = json.loads(payload)
    celery_own = app.amqp.as_task_v2(job_id, "fleet.run_job", args=[job_id], kwargs={})

    assert queue == "gpu80"
    assert envelope["headers"] == celery_own.headers
    assert json.loads(base64.b64decode(envelope["body"])) == [
        list(celery_own.body[0]),
        {},
        celery_own.body[2],
    ]
    assert envelope["properties"]["correlation_id"] == job_id
    assert envelope["properties"]["delivery_info"] == {"exchange": "", "routing_key": "gpu80"}
    assert envelope["content-type"] == "application/json"


def test_footprint_is_the_predicted_peak_in_the_classes_placement():
    ti2v = get_model("wan2.2-ti2v-5b")
    small, big = footprint_gb(ti2v, VramClass.GPU16), footprint_gb(ti2v, VramClass.GPU80)
    # Offloaded on the 16 GiB card: one component at a time, within the card less the margin.
    assert placement(ti2v, VramClass.GPU16) == Placement(Mode.MODEL_OFFLOAD, vae_tiling=True)
    assert small is not None and small <= 16 - Settings().vram_margin_gib
    # Resident on 80 GB: every component's weights at once, so more.
    assert placement(ti2v, VramClass.GPU80) == Placement(Mode.RESIDENT)
    assert big is not None and big > small
    assert footprint_gb(get_model("wan2.2-animate-14b"), VramClass.GPU16) is None


def test_every_model_lands_in_its_class_queue():
    for key, spec in CATALOG.items():
        assert route_model_default(key).vram_class is spec.vram_class, key


def route_model_default(key: str):
    """Route the catalog's default request of a model, bypassing the served check and media."""
    spec = get_model(key)
    request = types.SimpleNamespace(
        model=key,
        width=spec.size.default_width,
        height=spec.size.default_height,
        frames=spec.video.default_frames if spec.video else None,
    )
    return route(request)


def test_a_z_image_request_too_big_for_the_16gb_class_goes_to_80gb():
    spec = get_model("z-image-turbo")
    base = {"model": spec.key, "prompt": "x", "width": 2048, "height": 2048}
    # Without guidance, 2048x2048 fits the 16 GiB card one component at a time...
    assert route(parse_request(base)).vram_class is VramClass.GPU16
    # ...with it, Z-Image batches two passes a step: the transformer's peak outgrows the card.
    big = parse_request(base | {"guidance_scale": 4.0})
    peak = memory.predict(spec, VramClass.GPU16, memory.work_of(big, spec))
    assert peak is not None and peak.peak_gib > 16 - Settings().vram_margin_gib
    assert route(big).vram_class is VramClass.GPU80
    smaller = parse_request(base | {"guidance_scale": 4.0, "width": 1024, "height": 1024})
    assert route(smaller).vram_class is VramClass.GPU16


def test_a_request_no_class_holds_is_refused_naming_the_largest_that_fits():
    request = parse_request({"model": "qwen-image", "prompt": "x", "width": 2048, "height": 2048})
    peak = memory.predict(
        get_model("qwen-image"), VramClass.GPU80, memory.work_of(request, get_model("qwen-image"))
    )
    # At the margin's edge: a card less a margin that still holds the peak takes it...
    assert route(request, margin_gib=80 - peak.peak_gib).vram_class is VramClass.GPU80
    # ...a hair more margin and no class does: refused, naming the size that fits.
    with pytest.raises(InvalidRequest) as refused:
        route(request, margin_gib=80 - peak.peak_gib + 0.05)
    (error,) = refused.value.errors
    assert error.field == "width" and "at most 2032x2032" in error.message and "qwen-image" in error.message
    smaller = parse_request({"model": "qwen-image", "prompt": "x", "width": 2032, "height": 2032})
    assert route(smaller, margin_gib=80 - peak.peak_gib + 0.05).vram_class is VramClass.GPU80


def test_a_video_too_long_for_every_class_is_refused_naming_the_frames_that_fit():
    spec = get_model("wan2.2-animate-14b")
    request = types.SimpleNamespace(model=spec.key, width=1280, height=720, frames=617, guidance_scale=1.0)
    with pytest.raises(InvalidRequest) as refused:
        route(request, margin_gib=25)
    (error,) = refused.value.errors
    frames = int(error.message.rsplit("at most ", 1)[1].split()[0])
    assert error.field == "frames" and frames < 617
    assert route(types.SimpleNamespace(**vars(request) | {"frames": frames}), margin_gib=25).vram_class is (
        VramClass.GPU80
    )


@pytest.mark.parametrize("model", ["wan2.2-t2v-a14b", "wan2.2-i2v-a14b"])
def test_an_a14b_clip_the_80gb_class_does_not_hold_goes_to_the_group_loras_only_where_they_run(model):
    """The limits the catalog and README state, from the memory model: the 80 GB class (expert
    offload) holds 720p clips up to 177 frames and every 480p one; longer 720p clips go to the
    8xH100 class's group (sharded); LoRAs and variants, which the group does not apply, are
    refused past the 80 GB class's limit naming it."""
    spec = get_model(model)
    image = {"image": {"key": "a.png"}} if model.endswith("i2v-a14b") else {}
    base = {"model": model, "prompt": "x", **image}

    def routed(**fields):
        return route(parse_request(base | fields)).vram_class

    assert routed(width=1280, height=720, frames=177) is VramClass.GPU80
    assert routed(width=1280, height=720, frames=181) is VramClass.H100X8
    assert routed(width=720, height=1280, frames=241) is VramClass.H100X8
    assert routed(width=832, height=480, frames=241) is VramClass.GPU80
    assert placement(spec, VramClass.H100X8) == Placement(Mode.SHARDED)
    largest = memory.largest_request(spec, VramClass.GPU80)
    assert str(largest) == "1280x720x177"
    assert str(memory.largest_request(spec, VramClass.H100X8)) == "1280x720x241"

    # With a LoRA or the Lightning variant only the 80 GB class runs it.
    assert routed(width=1280, height=720, frames=177, variant="lightning-4") is VramClass.GPU80
    for extra in ({"variant": "lightning-4"}, {"loras": [{"source": "k", "expert": "high"}]}):
        with pytest.raises(InvalidRequest) as refused:
            routed(width=1280, height=720, frames=181, **extra)
        (error,) = refused.value.errors
        assert error.field == "frames", error
        assert "with LoRAs or a variant" in error.message and "(gpu80, expert-offload)" in error.message
        assert error.message.endswith("at most 177 frames"), error.message


def test_the_first_two_warm_sizes_differ_in_every_dimension():
    """Dynamo makes dynamic only the dimensions that changed between a graph's first shape and the
    next: a dimension the first two warm sizes share stays a constant, and the first job that
    changes it compiles (tests/unit/test_fused_qkv.py shows a job at new sizes compiling nothing
    after such a warm-up)."""
    checked = 0
    for spec in CATALOG.values():
        for vram_class, profile in spec.speed.items():
            if not profile.compile or len(profile.warm_sizes) < 2:
                continue
            first, second = profile.warm_sizes[:2]
            axes = 3 if spec.video is not None else 2
            assert all(a != b for a, b in zip(first[:axes], second[:axes], strict=True)), (
                spec.key,
                vram_class,
            )
            checked += 1
    assert checked >= 6  # Z-Image's three, the Qwen-Image family, TI2V-5B, Animate
