"""Bad input media and options are refused at submit, naming the field, with nothing queued."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from producer.client import Client
from routing.errors import InvalidRequest
from routing.io.net import UrlPolicy
from routing.io.storage import LocalStorage
from routing.jobs.events import Webhook
from worker.media import encode_mp4, encode_png

pytestmark = pytest.mark.integration

PNG = encode_png(Image.new("RGB", (64, 64), (10, 200, 30)))


class _Server:
    """HTTP on a loopback address: serves the PNG at /img.png, redirects /hop to ``target``."""

    def __init__(self, host: str, target: str = ""):
        self.hits = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits += 1
                if self.path == "/hop":
                    self.send_response(302)
                    self.send_header("Location", target)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(PNG)))
                self.end_headers()
                self.wfile.write(PNG)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def loopback() -> Iterator[_Server]:
    server = _Server("127.0.0.1")
    yield server
    server.close()


@pytest.fixture
def allowed(loopback: _Server) -> Iterator[_Server]:
    """A server the policy allows (127.0.0.2 stands for the internet) that redirects to loopback."""
    server = _Server("127.0.0.2", target=f"{loopback.url}/img.png")
    yield server
    server.close()


@pytest.fixture
def fleet(fleet_settings) -> Iterator[Client]:
    # "internal.example" resolves to 10.0.0.1: refused before any connection is made.
    def resolve(host: str, port: int) -> list[str]:
        return ["10.0.0.1"] if host == "internal.example" else [host]

    policy = UrlPolicy(resolver=resolve, allow_cidrs=("127.0.0.2/32",))
    with Client(fleet_settings, url_policy=policy) as client:
        yield client


def queued(redis_client) -> int:
    return sum(
        redis_client.llen(k) for p in ("gpu16*", "gpu80*", "h100x8*") for k in redis_client.scan_iter(p)
    )


EDIT = {"model": "qwen-image-edit", "prompt": "add a hat", "width": 64, "height": 64}


def refused(client: Client, redis_client, request: dict, field: str, words: str, **options) -> None:
    before = queued(redis_client)
    with pytest.raises(InvalidRequest) as raised:
        client.submit(request, **options)
    assert field in raised.value.fields, raised.value
    assert words in str(raised.value)
    assert queued(redis_client) == before


def test_a_fetchable_url_is_accepted_and_stored_so_the_worker_reads_only_checked_bytes(fleet, allowed):
    job = fleet.submit(EDIT | {"images": [{"url": f"{allowed.url}/img.png"}]})
    [image] = fleet.get(job.id).request["images"]
    assert image == {"key": f"inputs/_/{job.id}/images.0.png", "url": None}
    assert fleet.storage.get(image["key"]) == PNG
    # A URL of 4,096 characters, the most, is fetched as any other.
    longest = f"{allowed.url}/img.png?"
    longest += "a" * (4096 - len(longest))
    assert fleet.submit(EDIT | {"images": [{"url": longest}]}).created


def test_the_url_length_cap_is_a_setting_held_at_its_edge_for_media_loras_and_webhooks(
    fleet_settings, allowed, redis_client
):
    most = 100  # FLEET_MAX_URL_CHARS, from the settings as the API has it
    settings = fleet_settings.model_copy(update={"max_url_chars": most, "url_allow_cidrs": ["127.0.0.2/32"]})

    def url(length: int) -> str:
        head = f"{allowed.url}/img.png?"
        return head + "a" * (length - len(head))

    words = f"at most {most} characters"
    hook = Webhook(url(most + 1))
    with Client(settings) as client:
        assert client.url_policy.max_chars == most
        job = client.submit(EDIT | {"images": [{"url": url(most)}]}, webhook=Webhook(url(most)))
        assert job.created and client.get(job.id).request["images"][0]["key"].startswith("inputs/")
        refused(client, redis_client, EDIT | {"images": [{"url": url(most + 1)}]}, "images.0", words)
        refused(
            client, redis_client, EDIT | {"images": [{"url": url(most)}]}, "webhook.url", words, webhook=hook
        )
        lora = EDIT | {"images": [{"url": url(most)}], "loras": [{"source": url(most + 1)}]}
        refused(client, redis_client, lora, "loras.0.source", words)
        # A store key is held to the store's own cap instead.
        lora = EDIT | {"images": [{"url": url(most)}], "loras": [{"source": "uploads/_/" + "k" * 1020}]}
        refused(client, redis_client, lora, "loras.0.source", "at most 1024 characters")


def _data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def test_a_data_url_is_decoded_checked_stored_with_the_jobs_inputs_and_deleted_with_it(fleet):
    # The media type is not trusted: the bytes are checked, and named by what they are.
    job = fleet.submit(EDIT | {"images": [{"url": _data_url(PNG, "application/octet-stream")}]})
    [image] = fleet.get(job.id).request["images"]
    assert image == {"key": f"inputs/_/{job.id}/images.0.png", "url": None}
    assert fleet.storage.get(image["key"]) == PNG
    fleet.cancel(job.id)
    fleet.delete(job.id)
    assert fleet.storage.list(f"inputs/_/{job.id}/") == []


def test_bad_data_urls_are_refused_naming_the_field_and_nothing_is_stored(fleet_settings, redis_client):
    with Client(fleet_settings.model_copy(update={"max_input_bytes": len(PNG)})) as fits:
        for url, words in [
            (_data_url(PNG).replace(";base64", ""), "a data URL must be base64"),
            ("data:image/png;base64,iVBORw0KGgo=!", "not valid base64"),
            (_data_url(b"plain text", "text/plain"), "not an image"),
        ]:
            refused(fits, redis_client, EDIT | {"images": [{"url": url}]}, "images.0", words)
        # FLEET_MAX_INPUT_BYTES holds a data URL's file too: at the limit it is taken, a byte past
        # it is refused (told from the URL's length, before decoding).
        assert fits.submit(EDIT | {"images": [{"url": _data_url(PNG)}]}).created
    with Client(fleet_settings.model_copy(update={"max_input_bytes": len(PNG) - 1})) as tight:
        words = f"larger than {len(PNG) - 1} bytes"
        refused(tight, redis_client, EDIT | {"images": [{"url": _data_url(PNG)}]}, "images.0", words)
        long = _data_url(PNG + bytes(3 * len(PNG))) + "!"  # not base64 either: refused unread
        refused(tight, redis_client, EDIT | {"images": [{"url": long}]}, "images.0", words)
    # Only the one accepted job's file is stored.
    assert len(LocalStorage(fleet_settings.storage_dir).list("inputs/")) == 1
    # An http(s) URL has at most 4,096 characters by default (FLEET_MAX_URL_CHARS); a data URL
    # is held to the byte limit instead.
    too_long = "https://example.com/" + "a" * 4077
    with Client(fleet_settings) as client:
        refused(client, redis_client, EDIT | {"images": [{"url": too_long}]}, "images.0", "4096 characters")


def test_edit_without_an_image(fleet, redis_client):
    refused(fleet, redis_client, EDIT, "images", "Field required")
    refused(fleet, redis_client, EDIT | {"images": []}, "images", "at least 1")


def test_four_images_to_2509(fleet, redis_client):
    key = fleet.upload(PNG)
    refused(
        fleet,
        redis_client,
        EDIT | {"model": "qwen-image-edit-2509", "images": [key] * 4},
        "images",
        "at most 3",
    )


def test_mix_without_background_or_mask(fleet, redis_client):
    video = fleet.upload(encode_mp4([Image.new("RGB", (64, 64))] * 5, 30))
    request = {
        "model": "wan2.2-animate-14b",
        "mode": "mix",
        "prompt": "dance",
        "image": fleet.upload(PNG),
        "pose_video": video,
        "face_video": video,
    }
    refused(fleet, redis_client, request, "background_video", "required in mix mode")
    refused(fleet, redis_client, request | {"background_video": video}, "mask_video", "required in mix mode")


def test_a_video_longer_than_the_limit(fleet, redis_client):
    # Animate takes at most 617 frames (about 20 s at 30 fps).
    long_video = fleet.upload(encode_mp4([Image.new("RGB", (16, 16))] * 650, 30))
    image = fleet.upload(PNG)
    request = {"model": "wan2.2-animate-14b", "mode": "move", "prompt": "x", "image": image}
    refused(
        fleet,
        redis_client,
        request | {"pose_video": long_video, "face_video": long_video},
        "pose_video",
        "limit is 20.57 s",
    )


def _audio_only_mp4() -> bytes:
    """An MP4 holding a second of silence and no video stream."""
    import io

    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for i in range(16):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def test_an_animate_video_without_a_video_stream_or_over_the_limit_is_refused_naming_video(
    fleet, redis_client
):
    # An upload is refused as not a video, so the file is put in the tenant's uploads directly:
    # the submit check is what is under test.
    fleet.storage.put("uploads/_/silence.mp4", _audio_only_mp4(), "video/mp4")
    request = {"model": "wan2.2-animate-14b", "mode": "mix", "prompt": "x", "image": fleet.upload(PNG)}
    refused(
        fleet, redis_client, request | {"video": {"key": "uploads/_/silence.mp4"}}, "video", "no video stream"
    )
    # 617 frames at 30 fps is the limit: one frame past it is refused, the limit itself accepted.
    over = fleet.upload(encode_mp4([Image.new("RGB", (16, 16))] * 618, 30))
    refused(fleet, redis_client, request | {"video": over}, "video", "limit is 20.57 s")
    before = queued(redis_client)
    fleet.submit(request | {"video": fleet.upload(encode_mp4([Image.new("RGB", (16, 16))] * 617, 30))})
    assert queued(redis_client) == before + 1


def test_videos_over_the_jobs_pixel_cap_are_refused_naming_the_field(fleet_settings, redis_client):
    # Four 64x64 videos of 5 frames: 4 x 20,480 decoded pixels (each smaller than the output).
    one_video = 64 * 64 * 5
    at_cap = fleet_settings.model_copy(update={"max_input_video_pixels": 4 * one_video})
    below = fleet_settings.model_copy(update={"max_input_video_pixels": 4 * one_video - 1})
    with Client(at_cap) as fits, Client(below) as over:
        video = fits.upload(encode_mp4([Image.new("RGB", (64, 64))] * 5, 30))
        request = {
            "model": "wan2.2-animate-14b",
            "mode": "mix",
            "prompt": "dance",
            "image": fits.upload(PNG),
            "pose_video": video,
            "face_video": video,
            "background_video": video,
            "mask_video": video,
        }
        refused(over, redis_client, request, "mask_video", f"more than {4 * one_video - 1} pixels")
        before = queued(redis_client)
        fits.submit(request)
        assert queued(redis_client) == before + 1


def test_videos_over_the_requests_decode_budget_are_refused_unread_naming_the_field(
    fleet_settings, redis_client
):
    # Four 128x128 videos of 5 frames for a 64x64 output: the worker holds them scaled down
    # (4 x 64 x 64 x 5 pixels, exactly the scaled cap here), but checking them decodes each at
    # its stored size: 4 x 128 x 128 x 5 pixels.
    one_video = 128 * 128 * 5
    scaled = {"max_input_video_pixels": 4 * 64 * 64 * 5}
    at_budget = fleet_settings.model_copy(update=scaled | {"max_input_video_decode_pixels": 4 * one_video})
    below = fleet_settings.model_copy(update=scaled | {"max_input_video_decode_pixels": 4 * one_video - 1})
    with Client(at_budget) as fits, Client(below) as over:
        video = fits.upload(encode_mp4([Image.new("RGB", (128, 128), (i, 0, 0)) for i in range(5)], 30))
        request = {
            "model": "wan2.2-animate-14b",
            "mode": "mix",
            "prompt": "dance",
            "width": 64,
            "height": 64,
            "image": fits.upload(PNG),
            "pose_video": video,
            "face_video": video,
            "background_video": video,
            "mask_video": video,
        }
        # The last video is refused from its metadata: what is left is one pixel short of it.
        refused(over, redis_client, request, "mask_video", f"video is 128x128 x 5 frames: {one_video} pixels")
        before = queued(redis_client)
        fits.submit(request)
        assert queued(redis_client) == before + 1
        # An upload is checked within a budget of its own, and a video over it is refused as such.
        with Client(
            fleet_settings.model_copy(update={"max_input_video_decode_pixels": one_video - 1})
        ) as tight:
            with pytest.raises(InvalidRequest) as raised:
                tight.upload(encode_mp4([Image.new("RGB", (128, 128))] * 5, 30))
        assert "file" in raised.value.fields and f"{one_video} pixels to decode" in str(raised.value)


def test_bytes_that_are_not_an_image(fleet, redis_client):
    fleet.storage.put("uploads/_/fake.png", b"\x89PNG but not really", "image/png")
    refused(fleet, redis_client, EDIT | {"images": [{"key": "uploads/_/fake.png"}]}, "images.0", "image")
    refused(
        fleet,
        redis_client,
        EDIT | {"images": [{"key": "uploads/_/missing.png"}]},
        "images.0",
        "upload it first",
    )
    with pytest.raises(InvalidRequest, match="not an image, video or audio"):
        fleet.upload(b"plain text")


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://127.0.0.1:9/img.png", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        (
            "http://internal.example/img.png",
            "internal.example is refused: only hosts whose addresses are all public",
        ),
        ("ftp://example.com/img.png", "should match pattern"),
    ],
)
def test_urls_to_places_inside_are_refused(fleet, redis_client, loopback, url, words):
    field = "images.0.url" if url.startswith("ftp") else "images.0"
    refused(fleet, redis_client, EDIT | {"images": [{"url": url}]}, field, words)
    assert loopback.hits == 0


def test_a_redirect_to_loopback_is_refused(fleet, redis_client, allowed, loopback):
    refused(fleet, redis_client, EDIT | {"images": [{"url": f"{allowed.url}/hop"}]}, "images.0", "loopback")
    assert allowed.hits == 1 and loopback.hits == 0
