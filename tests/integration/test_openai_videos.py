"""The OpenAI-compatible Videos API through the OpenAI Python SDK itself, against a real uvicorn
API process, a real GPU worker process, real Redis and the local object store: videos made by the
fleet's small Wan2.2-TI2V-5B from text, from an image file and from an image data URL come back as
OpenAI videos, listed, downloaded and deleted; refusals are OpenAI errors naming the OpenAI field,
with nothing queued or stored."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from localfleet.process import ApiProcess
from routing.catalog import CATALOG
from routing.io.storage import LocalStorage
from routing.settings import Settings
from tests.api_tenants import SMALL as IMAGE_JOB
from tests.api_tenants import A, with_tenants
from tests.dropped import DropFirstResponse
from worker.media import decode_video, encode_mp4, encode_png

pytestmark = pytest.mark.integration

PNG = encode_png(Image.new("RGB", (64, 64), (10, 200, 30)))
MP4 = encode_mp4([Image.new("RGB", (64, 64), (10 * i, 60, 60)) for i in range(9)], 16)
ANIMATE = {
    "model": "wan2.2-animate-14b",
    "kind": "animate",
    "mode": "move",
    "prompt": "a dance",
    "width": 64,
    "height": 64,
}
SMALL = {"steps": 2, "seed": 3}  # the fleet's fields, beyond OpenAI's


@pytest.fixture
def settings(fleet_settings: Settings) -> Settings:
    return with_tenants(fleet_settings, "a", "b", worker_class="gpu80", openai_poll_after_ms=200)


@pytest.fixture
def api_url(settings: Settings, tmp_path: Path) -> Iterator[str]:
    with ApiProcess(settings, tmp_path / "api.log").wait_ready(60) as process:
        yield process.url


def _sdk(api_url: str, tenant: str = "a", max_retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{api_url}/v1", api_key=f"key-{tenant}", max_retries=max_retries, timeout=120
    )


def _api(api_url: str, path: str, **kwargs) -> dict:
    answer = httpx.post(f"{api_url}{path}", headers=A | kwargs.pop("headers", {}), trust_env=False, **kwargs)
    assert answer.is_success, answer.text
    return answer.json()


def _upload(api_url: str, data: bytes, media_type: str) -> dict[str, str]:
    return {"key": _api(api_url, "/v1/uploads", content=data, headers={"Content-Type": media_type})["key"]}


def _jobs(api_url: str, tenant: str = "a") -> list[dict]:
    headers = {"Authorization": f"Bearer key-{tenant}"}
    return httpx.get(f"{api_url}/v1/jobs", headers=headers, trust_env=False).json()["jobs"]


def test_the_openai_sdk_makes_lists_downloads_and_deletes_videos(api_url, settings, start_worker):
    start_worker(settings)
    sdk = _sdk(api_url)
    store = LocalStorage(settings.storage_dir)

    # Text to video. 0.2 s at 24 fps is 4.8 frames: the nearest count Wan makes (4k+1) is 5.
    made = sdk.videos.create(
        model="wan2.2-ti2v-5b", prompt="waves", size="64x96", seconds="0.2", extra_body=SMALL
    )
    assert made.status in ("queued", "in_progress") and made.object == "video" and made.size == "64x96"
    video = sdk.videos.poll(made.id)  # as create_and_poll does, told how often by the fleet
    assert video.status == "completed" and video.progress == 100 and video.error is None
    assert video.seconds == f"{5 / 24:.2f}" and video.prompt == "waves"
    assert video.expires_at == video.completed_at + settings.job_ttl_s
    mp4 = sdk.videos.download_content(video.id).read()
    frames, fps = decode_video(mp4)
    assert len(frames) == 5 and frames[0].size == (64, 96) and fps == 24
    # Its previews, made from the video when first asked for and kept beside it: the first
    # frame, and every frame of so short a video in a sheet (4 columns, then the 5th below).
    thumbnail = sdk.videos.download_content(video.id, variant="thumbnail").read()
    assert _image(thumbnail).format == "WEBP" and _differ(_image(thumbnail), frames[0]) < 4
    sheet = _image(sdk.videos.download_content(video.id, variant="spritesheet").read())
    assert sheet.format == "JPEG" and sheet.size == (4 * 64, 2 * 96)
    tiles = [
        sheet.crop((64 * (i % 4), 96 * (i // 4), 64 * (i % 4) + 64, 96 * (i // 4) + 96)) for i in range(5)
    ]
    assert all(_differ(tile, frame) < 8 for tile, frame in zip(tiles, frames, strict=True))
    assert len(store.list(f"jobs/{video.id}/")) == 3  # the MP4 and its two previews
    assert sdk.videos.download_content(video.id, variant="thumbnail").read() == thumbnail

    # Image to video, from an image file part; OpenAI's 1280x720 would be the model's 1280x704:
    # the size is rounded down to the model's multiple of 32 (here 80x72 -> 64x64).
    # The fleet's webhook rides along (the SDK sends it as webhook[url] and webhook[events][] parts).
    hook = {"url": "https://93.184.215.14/fleet", "events": ["succeeded", "failed"]}
    from_image = dict(
        prompt="it moves",
        input_reference=("a.png", PNG, "image/png"),
        size="80x72",
        seconds="0.2",
        extra_body=SMALL | {"webhook": hook},
        extra_headers={"Idempotency-Key": "v-1"},
    )
    from_file = sdk.videos.create(**from_image)
    assert from_file.model == settings.openai_video_model and from_file.size == "64x64"
    assert _job(api_url, from_file.id)["webhook"] == hook
    # The same call again (its answer lost, say): the same video; the image it sent again is not kept.
    again = sdk.videos.create(**from_image)
    # The image is the job's input, stored with it as a data URL's file is.
    [kept] = store.list("inputs/")
    assert (
        kept == _job(api_url, from_file.id)["request"]["image"]["key"] == f"inputs/a/{from_file.id}/image.png"
    )
    assert again.id == from_file.id and store.list("inputs/") == [kept] and store.get(kept) == PNG
    # The same key and fields with another image is another request: refused, and not kept.
    other = encode_png(Image.new("RGB", (64, 64), (200, 10, 30)))
    with pytest.raises(openai.ConflictError):
        sdk.videos.create(**(from_image | {"input_reference": ("a.png", other, "image/png")}))
    with pytest.raises(openai.ConflictError):  # or the same with its events sent elsewhere
        sdk.videos.create(
            **(from_image | {"extra_body": SMALL | {"webhook": hook | {"url": "https://93.184.215.15/"}}})
        )
    assert store.list("inputs/") == [kept]
    # From a base64 data URL, as JSON (SGLang's and curl's way).
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    from_url = httpx.post(
        f"{api_url}/v1/videos",
        headers={"Authorization": "Bearer key-a"},
        json={"prompt": "it moves", "input_reference": {"image_url": data_url}, "size": "64x64", **SMALL},
        trust_env=False,
    ).json()
    assert from_url["status"] == "queued", from_url
    for video_id in (from_file.id, from_url["id"]):
        assert sdk.videos.poll(video_id).status == "completed"
    assert [j["request"]["kind"] for j in _jobs(api_url)] == ["image-to-video"] * 2 + ["text-to-video"]
    assert len(store.list("inputs/")) == 2 and store.list("uploads/") == []

    # An image job of the tenant's is not a video: the list skips it, newest first, page by page.
    image_job = httpx.post(f"{api_url}/v1/jobs", headers=A, json=IMAGE_JOB, trust_env=False).json()
    assert "id" in image_job, image_job
    listed = [v.id for v in sdk.videos.list(limit=1)]  # the SDK follows last_id while has_more
    assert listed == [from_url["id"], from_file.id, video.id]
    assert image_job["id"] not in listed and sdk.videos.list(limit=2).has_more
    assert [v.id for v in sdk.videos.list(after=from_url["id"])] == [from_file.id, video.id]
    # Oldest first, page by page too, and from a video on.
    assert [v.id for v in sdk.videos.list(limit=1, order="asc")] == [video.id, from_file.id, from_url["id"]]
    assert [v.id for v in sdk.videos.list(after=video.id, order="asc")] == [from_file.id, from_url["id"]]
    # Another tenant's videos are not there, and its ids are unknown here.
    assert list(_sdk(api_url, "b").videos.list()) == []
    with pytest.raises(openai.NotFoundError):
        _sdk(api_url, "b").videos.retrieve(video.id)
    with pytest.raises(openai.NotFoundError):
        sdk.videos.retrieve(image_job["id"])

    # A video whose file the store no longer keeps (its retention ran out before its record's
    # TTL): a 404 saying so, before any answer starts, for the MP4 and for a preview not made yet.
    store.delete(_outputs(api_url, from_url["id"])[0])
    for variant in ("video", "spritesheet"):
        with pytest.raises(openai.NotFoundError) as gone:
            sdk.videos.download_content(from_url["id"], variant=variant)
        assert gone.value.body["code"] == "video_file_gone", gone.value.body

    # Deleted: its file and its record are gone at once, not at the record's TTL. The first
    # answer is lost; the SDK's retry is answered deleted too (FLEET_DELETED_JOB_TTL_S).
    [output] = _outputs(api_url, video.id)
    dropping = DropFirstResponse(lambda r: r.method == "DELETE")
    retrying = openai.OpenAI(
        base_url=f"{api_url}/v1",
        api_key="key-a",
        max_retries=1,
        http_client=httpx.Client(transport=dropping, timeout=120, trust_env=False),
    )
    deleted = retrying.videos.delete(video.id)
    assert dropping.dropped == 1
    assert deleted.deleted and deleted.id == video.id and deleted.object == "video.deleted"
    with pytest.raises(openai.NotFoundError):  # to another tenant, as unknown as ever
        _sdk(api_url, "b").videos.delete(video.id)
    assert not store.exists(output) and store.list(f"jobs/{video.id}/") == []  # previews too
    with pytest.raises(openai.NotFoundError):
        sdk.videos.retrieve(video.id)
    assert video.id not in [v.id for v in sdk.videos.list()]
    assert video.id not in [j["id"] for j in _jobs(api_url)]
    # A video made from an image: the image goes with it.
    assert sdk.videos.delete(from_file.id).deleted
    assert store.list(f"inputs/a/{from_file.id}/") == [] and store.list(f"jobs/{from_file.id}/") == []


def _image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _differ(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference of two same-size images' RGB values (0-255)."""
    pixels = zip(a.convert("RGB").getdata(), b.convert("RGB").getdata(), strict=True)
    return sum(abs(x - y) for p, q in pixels for x, y in zip(p, q, strict=True)) / (a.width * a.height * 3)


def _job(api_url: str, job_id: str) -> dict:
    return httpx.get(
        f"{api_url}/v1/jobs/{job_id}", headers={"Authorization": "Bearer key-a"}, trust_env=False
    ).json()


def _outputs(api_url: str, job_id: str) -> list[str]:
    headers = {"Authorization": "Bearer key-a"}
    job = httpx.get(f"{api_url}/v1/jobs/{job_id}", headers=headers, trust_env=False).json()
    return [o["key"] for o in job["outputs"]]


def test_a_refused_call_is_an_openai_error_naming_its_field_and_nothing_is_queued_or_stored(
    api_url, settings
):
    sdk = _sdk(api_url)
    ti2v = CATALOG["wan2.2-ti2v-5b"].video

    def refused(param: str, **create: object) -> str:
        with pytest.raises(openai.BadRequestError) as error:
            sdk.videos.create(**({"prompt": "waves"} | create))
        assert error.value.body["param"] == param, error.value.body
        return error.value.body["message"]

    # 241 frames at 24 fps is the most: 10.04 s.
    assert f"at most {int(ti2v.max_frames / ti2v.fps * 100) / 100:g} " in refused("seconds", seconds="12")
    assert "does not make videos" in refused("model", model="z-image-turbo")
    assert "takes an input_reference" in refused("input_reference", model="wan2.2-i2v-a14b")
    assert "takes no input_reference" in refused(
        "input_reference", model="wan2.2-t2v-a14b", input_reference=("a.png", PNG, "image/png")
    )
    # A webhook the fleet would not call, checked as POST /v1/jobs checks it, before queueing.
    assert "10.0.0.1" in refused("webhook.url", extra_body={"webhook": {"url": "http://10.0.0.1/hook"}})
    assert refused(
        "webhook.events.0", extra_body={"webhook": {"url": "https://93.184.215.14/", "events": ["done"]}}
    )
    # An input_reference object, as JSON and as the form fields a multipart client makes of it
    # (the Python SDK sends files only).
    http = httpx.Client(base_url=api_url, headers={"Authorization": "Bearer key-a"}, trust_env=False)
    for body in (
        {"json": {"prompt": "waves", "input_reference": {"file_id": "file-1"}}},
        {"files": {"prompt": (None, "waves"), "input_reference[file_id]": (None, "file-1")}},
    ):
        answer = http.post("/v1/videos", **body)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "input_reference"
        assert "Files API" in answer.json()["error"]["message"]
    bad_url = http.post(
        "/v1/videos", json={"prompt": "waves", "input_reference": {"image_url": "data:image/png;base64,@@"}}
    )
    assert "base64" in bad_url.json()["error"]["message"]
    assert http.post("/v1/videos", content=b"{").json()["error"]["type"] == "invalid_request_error"
    # JSON's types are held to, as in POST /v1/jobs (a form's strings are read as numbers); OpenAI's
    # seconds is a string, and a number is taken too.
    for field, value in (("seconds", True), ("seed", "5"), ("steps", 2.5), ("guidance_scale", False)):
        wrong = http.post("/v1/videos", json={"prompt": "waves", field: value})
        assert (wrong.status_code, wrong.json()["error"]["param"]) == (400, field), wrong.text
    refused("input_reference", input_reference=("a.png", b"not a png", "image/png"))
    assert "not supported" in refused("remix_video_id", extra_body={"remix_video_id": "x"})
    assert "between 64 and 1280" in refused("size", size="16x16")  # 32x32, the model's multiple
    assert "between 64 and 1280" in refused("size", size="4096x4096")
    with pytest.raises(openai.NotFoundError):
        sdk.videos.retrieve("0" * 32)
    with pytest.raises(openai.AuthenticationError):
        _sdk(api_url, "nobody").videos.create(prompt="waves")
    with pytest.raises(openai.BadRequestError) as order:
        sdk.videos.list(order="sideways")  # type: ignore[arg-type]
    assert order.value.body["param"] == "order"

    assert _jobs(api_url) == []
    assert LocalStorage(settings.storage_dir).list("inputs/") == []
    assert LocalStorage(settings.storage_dir).list("uploads/") == []


def test_a_video_not_made_yet_has_no_content_and_deleting_it_cancels_it(api_url, settings):
    sdk = _sdk(api_url, max_retries=2)  # the answers below say not to retry: the SDK does not
    made = sdk.videos.create(prompt="waves", size="64x64", extra_body=SMALL)  # no worker: it waits

    polled = sdk.with_raw_response.videos.retrieve(made.id)
    assert polled.headers["openai-poll-after-ms"] == "200" and polled.parse().progress == 0
    with pytest.raises(openai.ConflictError) as content:
        sdk.videos.download_content(made.id)
    assert content.value.body["code"] == "video_queued"
    assert content.value.response.headers["x-should-retry"] == "false"
    with pytest.raises(openai.ConflictError) as thumbnail:  # nor any preview
        sdk.videos.download_content(made.id, variant="thumbnail")
    assert thumbnail.value.body["code"] == "video_queued"
    with pytest.raises(openai.BadRequestError) as variant:
        sdk.videos.download_content(made.id, variant="poster")
    assert variant.value.body["param"] == "variant"

    # A queued video deleted is canceled first: it never runs, and nothing of it is left.
    assert sdk.videos.delete(made.id).deleted
    assert _jobs(api_url) == []
    with pytest.raises(openai.NotFoundError):
        sdk.videos.retrieve(made.id)

    # An Animate job, made through the fleet's API (its inputs are no OpenAI field), is a video
    # here too: listed, followed, not downloadable yet, deleted; to another tenant, unknown.
    animate = _api(
        api_url,
        "/v1/jobs",
        json=ANIMATE
        | {"image": _upload(api_url, PNG, "image/png"), "video": _upload(api_url, MP4, "video/mp4")},
    )["id"]
    [listed] = sdk.videos.list().data
    assert (listed.id, listed.model, listed.status, listed.prompt) == (
        animate,
        "wan2.2-animate-14b",
        "queued",
        "a dance",
    )
    assert (listed.size, listed.seconds) == ("64x64", "0")  # its length follows its driving video, once made
    with pytest.raises(openai.ConflictError):
        sdk.videos.download_content(animate)
    with pytest.raises(openai.NotFoundError):
        _sdk(api_url, "b").videos.retrieve(animate)
    assert sdk.videos.delete(animate).deleted and _jobs(api_url) == []

    # An image job the tenant deleted is no video of this door's, its delete repeated or not.
    image_job = httpx.post(f"{api_url}/v1/jobs", headers=A, json=IMAGE_JOB, trust_env=False).json()["id"]
    for query in ("", "?purge=true", "?purge=true"):  # cancel, delete, and the repeat of the delete
        assert httpx.delete(f"{api_url}/v1/jobs/{image_job}{query}", headers=A, trust_env=False).is_success
    with pytest.raises(openai.NotFoundError):
        sdk.videos.delete(image_job)


def test_deleting_a_video_being_made_cancels_it_and_deletes_it_once_stopped(api_url, settings, start_worker):
    start_worker(settings)
    sdk = _sdk(api_url)
    # Big enough that the small model takes seconds, so the test can act while it runs.
    made = sdk.videos.create(prompt="slow", size="640x352", seconds="2", extra_body={"steps": 50})
    deadline = time.monotonic() + 120
    while (video := sdk.videos.retrieve(made.id)).progress == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert video.status == "in_progress" and 0 < video.progress < 100

    with pytest.raises(openai.ConflictError) as running:
        sdk.videos.delete(made.id)
    assert running.value.body["code"] == "video_in_progress"
    stopped = sdk.videos.poll(made.id)
    assert stopped.status == "failed" and stopped.error.code == "canceled"
    assert sdk.videos.delete(made.id).deleted
    assert _jobs(api_url) == []


def test_a_list_reads_at_most_list_scan_jobs_and_says_where_to_go_on(settings, tmp_path):
    scan = 3  # FLEET_OPENAI_LIST_SCAN: the tenant's jobs one list call reads
    settings = settings.model_copy(update={"openai_list_scan": scan})
    with ApiProcess(settings, tmp_path / "api.log").wait_ready(60) as api:
        sdk = _sdk(api.url)
        video = sdk.videos.create(prompt="waves", size="64x64", extra_body=SMALL)  # no worker: it waits

        def image_job() -> str:
            return httpx.post(f"{api.url}/v1/jobs", headers=A, json=IMAGE_JOB, trust_env=False).json()["id"]

        images = [image_job(), image_job()]
        # The video is the third job back: one call reads it.
        assert [v.id for v in sdk.videos.list(limit=5).data] == [video.id]
        images.append(image_job())
        # Now the fourth: the call reads three image jobs, finds no video, and says to go on.
        first = sdk.videos.list(limit=5)
        assert (first.data, first.has_more, first.last_id) == ([], True, images[0])
        assert [v.id for v in sdk.videos.list(limit=5, after=first.last_id).data] == [video.id]
        # limit is 1 to 100.
        headers = {"Authorization": "Bearer key-a"}
        assert (
            httpx.get(f"{api.url}/v1/videos?limit=100", headers=headers, trust_env=False).status_code == 200
        )
        assert (
            httpx.get(f"{api.url}/v1/videos?limit=101", headers=headers, trust_env=False).status_code == 422
        )
