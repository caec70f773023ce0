"""The fleet's settings: one typed object, read from ``FLEET_*`` environment variables.

Every process (SDK, CLI, worker, benchmarks) reads the same object, so a value means the same
thing wherever it is used. Defaults are the embedded set-up: the local Redis and a local
object-store directory.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from routing.classes import Priority
from routing.jobs import usage

# A tenant's name is a segment of its store keys (``uploads/<tenant>/...``): lowercase letters,
# digits, '-' and '_', at most 64, starting with a letter or digit. Lowercase only, so that one name
# is one folder even on a case-insensitive disk.
TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
# The folder, and the usage, of jobs submitted without a tenant (the Redis SDK's default): never a
# tenant's name.
NO_TENANT = "_"


class Tenant(BaseModel):
    """A backend that uses the fleet: its API keys, the secret its webhooks are signed with
    (Standard Webhooks ``whsec_...``), how many of its jobs may be unfinished at once, the
    priorities its jobs may ask for (``high`` jumps ahead of every other tenant's work, so it is
    given, not taken), and the GPU-seconds its jobs may use in one UTC month (as ``GET
    /v1/usage`` counts them; None: no budget)."""

    api_keys: list[SecretStr] = Field(min_length=1)
    webhook_secret: SecretStr
    max_in_flight: int = Field(default=100, gt=0)
    priorities: list[Priority] = Field(default_factory=lambda: [Priority.NORMAL, Priority.LOW], min_length=1)
    gpu_s_per_month: float | None = Field(default=None, ge=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEET_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    # Redis Sentinel, for a Redis that outlives its master. Empty: the one Redis at redis_url.
    # Set ("host:port" of each Sentinel, comma-separated as KEDA's redis-sentinel scaler reads
    # them, or a JSON list): every process (API, workers, Flower, SDK) asks them for the master
    # named redis_sentinel_master and follows it when they promote a replica; redis_url then gives
    # only the database, user and password of the data nodes (its host is not used).
    redis_sentinels: Annotated[list[str], NoDecode] = Field(default_factory=list)
    redis_sentinel_master: str = Field(default="fleet", min_length=1)
    # The Sentinels' own password (their requirepass), when they have one.
    redis_sentinel_password: SecretStr | None = None
    # Replicas that must hold an accepted job before its submit is answered (Redis WAIT on the
    # submit's connection), and how long to wait for them: a submit they do not confirm in time is
    # answered 503 (submit again with the same Idempotency-Key). A job's other moves (claimed,
    # ended, canceled) and a new API key wait too, and go on with a warning after the timeout.
    # 0: answered once the master has it (a failover may lose the last second of writes).
    redis_min_replicas: int = Field(default=0, ge=0)
    redis_replica_timeout_ms: int = Field(default=1000, gt=0)
    # Prefix of every key the fleet writes (job records, idempotency keys, events). Tests give
    # each run its own so they never see another run's state.
    key_prefix: str = "fleet"

    storage_backend: Literal["local", "s3"] = "local"
    storage_dir: Path = Path("var/objects")
    s3_endpoint_url: str | None = None
    s3_bucket: str = "fleet-outputs"
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    presign_expiry_s: int = Field(default=3600, gt=0, le=7 * 24 * 3600)

    # Input media fetched from URLs: the largest accepted, and address ranges exempt from the
    # refusal of loopback/private/link-local targets (empty in production; tests allow one).
    max_input_bytes: int = Field(default=200 * 1024 * 1024, gt=0)
    url_allow_cidrs: list[str] = Field(default_factory=list)
    # Ports a fetched or webhook URL may name on a public host.
    url_allow_ports: list[int] = Field(default_factory=lambda: [80, 443])
    # The longest http(s) URL a request may give: its media, its LoRAs, its webhook (a data URL
    # is held to FLEET_MAX_INPUT_BYTES instead).
    max_url_chars: int = Field(default=4096, ge=64)
    # Longest all the fetches of one request (its media URLs and LoRA URLs together) may take,
    # connect to last byte, redirects included: one deadline per request.
    fetch_timeout_s: float = Field(default=15.0, gt=0)
    # Submits of one tenant that may be downloading at once in one API process (more: 429), and
    # the threads an API process gives such submits at most: the rest of its threads serve other
    # requests whatever the URLs do (health checks have threads of their own).
    max_fetching_submits: int = Field(default=4, ge=1)
    api_fetch_threads: int = Field(default=16, ge=1)
    # Uploads of one tenant that one API process takes at once (more: 429). Each is streamed to
    # a temporary file, never held in memory; the OpenAI-compatible calls that send files (held
    # in memory while read, checked and stored) count among them.
    max_concurrent_uploads: int = Field(default=2, ge=1)
    # Decoded pixels (width x height x frames, summed over a job's input videos) one job may
    # bring: what a worker holds in host memory at 3 bytes a pixel (the default: about 3 GB).
    max_input_video_pixels: int = Field(default=1024 * 1024 * 1024, gt=0)
    # Pixels the API may decode to check the videos of one request (or one upload), at the size
    # they are stored: width x height x frames, checked from the containers' metadata before a
    # frame is decoded and counted while decoding (metadata can lie). The default, 2^32, takes
    # full-HD videos of the longest any model takes (1920x1080x800, 1.7 Gpx) twice over, and
    # full-HD sources of every job max_input_video_pixels admits at 720p; it refuses an 800-frame
    # 4096x4096 file (13 Gpx) before decoding it.
    max_input_video_decode_pixels: int = Field(default=4 * 1024 * 1024 * 1024, gt=0)

    # The HTTP API: the largest JSON body (uploads are capped by max_input_bytes), and how many
    # webhook replays one job, and one tenant, may ask for within replay_window_s.
    max_json_body_bytes: int = Field(default=1024 * 1024, gt=0)
    replay_per_job: int = Field(default=10, ge=1)
    replay_per_tenant: int = Field(default=100, ge=1)
    replay_window_s: int = Field(default=3600, ge=1)
    # Submits (POST /v1/jobs) and cancels (DELETE /v1/jobs/{id}) one tenant may make within
    # rate_window_s; more are refused with 429 and Retry-After.
    submits_per_tenant: int = Field(default=600, ge=1)
    cancels_per_tenant: int = Field(default=600, ge=1)
    rate_window_s: int = Field(default=60, ge=1)
    # Port (on metrics_address) of the API process's Prometheus endpoint; None: not served. It is
    # never served on the API's own port, which tenants reach.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_address: str = "0.0.0.0"
    # Whether the endpoint shows the fleet_tenant_* series, one per tenant x model x class x end:
    # turn off where there are many tenants (usage stays in GET /v1/usage).
    metrics_per_tenant: bool = True

    # Most images one text-to-image job may make (its ``num_outputs``).
    max_num_outputs: int = Field(default=4, ge=1, le=16)

    # Tenants by name (FLEET_TENANTS, JSON). The HTTP API refuses every request without one.
    tenants: dict[str, Tenant] = Field(default_factory=dict)
    # Least seconds between two progress webhooks of one job.
    progress_webhook_interval_s: float = Field(default=2.0, ge=0)
    # Longest ``Prefer: wait=N`` a submit may ask for (the API holds the request open that long),
    # and the seconds between keepalive comments on an idle live-events stream.
    max_prefer_wait_s: int = Field(default=60, ge=1, le=600)
    events_keepalive_s: float = Field(default=15.0, gt=0, le=300)
    # Open live-event streams (GET /v1/jobs/{id}/events) and Prefer: wait submits one API process
    # holds, per tenant and in all; more are refused with 429. Each holds a Redis connection of
    # the process's async pool, which is sized from these (their sum and a few spare).
    event_streams_per_tenant: int = Field(default=20, ge=1)
    event_streams_per_api: int = Field(default=200, ge=1)
    prefer_waits_per_tenant: int = Field(default=20, ge=1)
    prefer_waits_per_api: int = Field(default=200, ge=1)
    # Deliveries one webhooks worker makes at once (threads: the work is waiting on receivers).
    webhook_concurrency: int = Field(default=8, ge=1, le=256)
    # Delivery attempts of one webhook event before it is given up, and the retry schedule: the
    # wait before attempt n+1 is uniform in [0, min(cap, base * 2^(n-1))] (full jitter), never
    # under 1 s. The cap bounds a receiver's Retry-After too: no retry waits longer.
    webhook_max_attempts: int = Field(default=8, ge=1, le=100)
    webhook_retry_base_s: float = Field(default=2.0, gt=0)
    webhook_retry_cap_s: float = Field(default=600.0, ge=1)
    # After this, the broker hands an unacknowledged webhook message to another webhooks worker.
    # A delivery waits out its retry unacknowledged, so the longest wait plus one delivery
    # (webhook_retry_cap_s + webhook_timeout_s) must end before it: checked when settings load.
    webhook_visibility_timeout_s: int = Field(default=1800, ge=30)
    # Of those, how many one tenant's endpoints may hold at once; a delivery past it is deferred.
    webhook_tenant_concurrency: int = Field(default=4, ge=1, le=256)
    # Deferrals of one delivery (the tenant's threads all busy) after which each counts as a failed attempt.
    webhook_max_deferrals: int = Field(default=20, ge=0, le=1000)
    # Longest one delivery may take, connect to last byte of the answer.
    webhook_timeout_s: float = Field(default=15.0, gt=0)
    # URLs of one tenant a 410 disabled that are remembered (past it, others are forgotten at
    # random), and how long after its last 410 a tenant's set is kept.
    webhook_disabled_max_urls: int = Field(default=1000, ge=1)
    webhook_disabled_ttl_s: int = Field(default=30 * 24 * 3600, ge=1)

    # Where weights come from. A model's weights are, in order: an entry of `weights`
    # (model key -> path or hub id), `<model_root>/<model key>` when model_root is set, else the
    # catalog's hub id.
    model_root: Path | None = None
    weights: dict[str, str] = Field(default_factory=dict)
    # A node-local copy of weights (NVMe): `<weights_cache_dir>/<model key>`, when that directory
    # exists, is read instead of any of the above. A worker with one fills it from the object
    # store before loading a model mirrored there (`python -m worker.weights mirror`): ranged
    # reads of weights_fill_chunk_bytes, weights_fill_threads at once, each file checked against
    # the mirror's manifest.
    weights_cache_dir: Path | None = None
    weights_fill_chunk_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    weights_fill_threads: int = Field(default=16, ge=1, le=256)
    device: str = "auto"  # "auto" picks cuda when present
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    # The class of GPU this worker runs on: decides which queues it consumes.
    worker_class: Literal["gpu16", "gpu80", "h100x8"] = "gpu16"
    # Models to load when the worker process starts, before taking the first job.
    warm_models: list[str] = Field(default_factory=list)
    # Models an h100x8 worker runs inside its resident torchrun group (every model the catalog
    # shards on the class), and the group's size (8 on p5.48xlarge; 4 allowed).
    group_models: list[str] = Field(
        default_factory=lambda: ["wan2.2-s2v-14b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b"]
    )
    group_world_size: int = Field(default=8, ge=1, le=8)
    # Longest wait of any collective in the group (a dead rank must not hang the others), the
    # longest the group may take to load, and where the ranks' output goes (None: a temp dir).
    group_timeout_s: float = Field(default=900, gt=0)
    group_start_timeout_s: float = Field(default=1800, gt=0)
    group_log_dir: Path | None = None
    # After one rank's own error mid-job, how long the other ranks get to finish the job before
    # the group is killed: they may be waiting for the failed rank in a collective.
    group_error_grace_s: float = Field(default=30, gt=0)
    # The single-GPU adapter the ranks run for a model with no group model of its own, by model
    # key, over settings.adapters and the built-in ones; for a model with one (S2V), the group
    # model class the ranks run instead of it.
    group_adapters: dict[str, str] = Field(default_factory=dict)
    # VRAM the worker's resident models may take on its GPU; one GPU of the class when unset.
    vram_budget_gb: int | None = Field(default=None, gt=0)
    # GPU memory kept free on every card when routing: a class takes a request only when the
    # request's predicted peak fits its card's memory minus this (CUDA context, the allocator's
    # fragmentation, and the error of the memory model's estimates). See routing/memory.
    vram_margin_gib: float = Field(default=2.0, ge=0.0, le=64.0)
    # Generated jobs whose outputs may wait to be encoded, stored and recorded while the GPU
    # generates the next one; a job that finds them all taken waits, so a slow store slows
    # generation instead of filling memory. 0: encode and store before taking the next job.
    max_pending_outputs: int = Field(default=1, ge=0, le=8)
    # While a job generates, fetch and decode the input media of the job at the head of the
    # worker's queues (nothing is taken from the queue: priorities still decide what runs).
    decode_ahead: bool = True

    # Speed profile (routing/catalog.py has one per model and class). "auto": the catalog's
    # profile on a GPU, eager on the CPU; "compile": the profile on any device (inductor on the
    # CPU: slow to compile, for tests); "eager": never compile.
    compile_profile: Literal["auto", "compile", "eager"] = "auto"
    # Attention backend (a diffusers name such as "flash" or "native"); "auto" takes the first of
    # the profile's list that the device has.
    attention_backend: str = "auto"
    # FP8 linear layers and CUDA graphs: "auto" as the model's profile says (off everywhere until
    # measured), "on" or "off" for every model. A device without them runs without, and says why.
    fp8: Literal["auto", "on", "off"] = "auto"
    cuda_graphs: Literal["auto", "on", "off"] = "auto"
    # The text encoder's layers compiled with the transformer's blocks: "auto" as the model's
    # profile says (off everywhere until measured), "on" or "off" for every compiled model.
    compile_text_encoder: Literal["auto", "on", "off"] = "auto"
    # Fused QKV projections in the Wan, Qwen-Image and Z-Image attention (one GEMM for query, key
    # and value in base jobs): "auto" as the model's profile says (off everywhere until measured),
    # "on" or "off" for every model that has them. An offloaded model or FP8 layers run without,
    # saying why.
    fused_qkv: Literal["auto", "on", "off"] = "auto"
    # TF32 for the official Wan code's float32 parts in the torchrun group: "auto" as the model's
    # profile says (off everywhere until measured), "on" or "off" for every group model.
    tf32: Literal["auto", "on", "off"] = "auto"
    # Sizes to warm a compiled model on, by model key ([width, height, frames or 0], ...), over the
    # catalog's class sizes (tests warm small ones).
    warm_sizes: dict[str, list[tuple[int, int, int]]] = Field(default_factory=dict)

    # LoRAs per request: how many, the largest file, and the rank of the slot they are merged
    # into (their ranks together at most this; the slot's memory is counted in the pool budget).
    max_loras: int = Field(default=3, ge=0, le=8)
    max_lora_bytes: int = Field(default=2 * 1024**3, gt=0)
    lora_max_rank: int = Field(default=64, ge=1, le=1024)
    # A LoRA's safetensors header: the most bytes of it that are parsed, and the most tensors it
    # may name (a LoRA's header is kilobytes; parsed JSON takes many times its size in memory).
    lora_max_header_bytes: int = Field(default=4 * 1024 * 1024, ge=64)
    lora_max_tensors: int = Field(default=10_000, ge=1)
    # Accept hub ids ("owner/repo/file.safetensors"): the API fetches them from huggingface.co
    # through the URL guard at submit, so only the API, never a worker, must reach the hub.
    lora_hub: bool = False
    # Where a worker keeps LoRA files by content hash, and how many bytes of them.
    lora_cache_dir: Path = Path("var/lora-cache")
    lora_cache_bytes: int = Field(default=20 * 1024**3, gt=0)
    # Animate's preprocessing results (pose, face, background and mask videos), by the content
    # hashes of the photo, the video and the options: least recently used evicted past the bytes.
    preprocess_cache_dir: Path = Path("var/preprocess-cache")
    preprocess_cache_bytes: int = Field(default=20 * 1024**3, gt=0)
    # Least seconds between two progress events of one preprocessing stage (the first of each
    # stage goes out at once); a cancel is looked for at every frame all the same.
    preprocess_progress_interval_s: float = Field(default=0.5, ge=0)
    # A variant's LoRA file (a checkpoint variant: its diffusers folder) by "<model key>:<variant>",
    # over the catalog's hub file (as `weights` does for models).
    variant_weights: dict[str, str] = Field(default_factory=dict)
    # Rank the LoRA slot keeps for a variant's LoRA, beside the request's, on models with variants.
    variant_lora_rank: int = Field(default=64, ge=1, le=1024)

    # Delivery attempts of one job before it is failed and dead-lettered: a job that kills its
    # worker every time must not loop forever.
    max_attempts: int = Field(default=3, ge=1, le=20)
    # A worker that has not said it is alive for this long is dead: its jobs are handed back.
    heartbeat_ttl_s: float = Field(default=30.0, gt=0)
    # How many times a Redis command is retried (with backoff up to 2 s) across a Redis restart.
    redis_retries: int = Field(default=40, ge=0)
    # Adapters by model key, over the built-in ones ("module:Class"): for models of your own.
    adapters: dict[str, str] = Field(default_factory=dict)

    # How long a finished job's record is kept, and the record of one canceled before it started
    # (a submit-and-cancel loop must not fill Redis for days).
    job_ttl_s: int = Field(default=7 * 24 * 3600, gt=0)
    canceled_job_ttl_s: int = Field(default=3600, gt=0)
    # How long the id of a job deleted on request is remembered (with its tenant, nothing else),
    # so a delete repeated meanwhile (an SDK's retry after a lost answer) is answered as the first
    # was, not 404. 0: not remembered.
    deleted_job_ttl_s: int = Field(default=3600, ge=0)
    # Days a stored object is kept, by kind (its key's first segment): outputs (jobs/), inputs
    # fetched or stored for a job (inputs/), uploads (uploads/), checked LoRAs (loras/, counted
    # from the last request that named one); routing.io.retention reads retention_<kind>_days.
    # The fleet deletes them from a local store (every retention_sweep_interval_s, in each
    # worker); an S3 bucket gets them as lifecycle rules (`python -m routing lifecycle`).
    # Outputs outlive their job's record, and inputs and LoRAs the longest a job can still run:
    # see _retention_outlives_its_readers.
    retention_outputs_days: int = Field(default=8, ge=1)
    retention_inputs_days: int = Field(default=7, ge=1)
    retention_uploads_days: int = Field(default=30, ge=1)
    retention_loras_days: int = Field(default=30, ge=1)
    retention_sweep_interval_s: float = Field(default=3600.0, gt=0)
    # Days each UTC day of a tenant's usage (routing.jobs.usage: jobs, GPU-seconds, outputs) is
    # kept after it, and the most days one usage query (GET /v1/usage) may span.
    usage_retention_days: int = Field(default=usage.DEFAULT_RETENTION_DAYS, ge=1)
    usage_max_days: int = Field(default=92, ge=1)
    # API keys one tenant may make itself (POST /v1/keys; producer.api_keys), beside its
    # FLEET_TENANTS keys.
    max_keys_per_tenant: int = Field(default=20, ge=1)
    # The OpenAI-compatible Images API (producer.openai_images): how long a call waits for its job
    # (then 408: the job goes on), and the models a call that names none uses.
    openai_wait_s: float = Field(default=300.0, gt=0)
    openai_image_model: str = "z-image-turbo"
    openai_edit_model: str = "qwen-image-edit-2509"
    # The OpenAI-compatible Videos API (producer.openai_videos): the model a create call that names
    # none gets, and how long the SDKs' create_and_poll waits between polls of a video being made.
    openai_video_model: str = "wan2.2-ti2v-5b"
    openai_poll_after_ms: int = Field(default=2000, ge=100, le=60_000)
    # The most of a tenant's jobs one GET /v1/videos reads looking for videos among its other
    # jobs (then has_more: the caller goes on from last_id).
    openai_list_scan: int = Field(default=1000, ge=1, le=100_000)
    # Where the API and workers send their traces, over OTLP/HTTP (routing.tracing): the base URL
    # of an OpenTelemetry Collector, Jaeger or Tempo. Unset: nothing is traced.
    otlp_endpoint: str | None = None
    # Newest entries the dead-letter list keeps; older ones are trimmed as new ones come.
    max_dead_letters: int = Field(default=10_000, ge=1)
    # Longest a job may wait in a queue (it then fails), and run (time limits: soft 60 s before).
    max_wait_s: int = Field(default=6 * 3600, gt=0)
    max_run_s: int = Field(default=2 * 3600, gt=0)
    # Seconds between sweeps that expire jobs queued past max_wait_s on classes no worker takes
    # (the API process sweeps on this interval; workers on it, or their heartbeat's if longer).
    expiry_sweep_interval_s: float = Field(default=30.0, gt=0)
    # After this, the broker hands an unacknowledged GPU message to another worker: a job still
    # running on a live worker drops that copy; one whose worker died runs again.
    visibility_timeout_s: int = Field(default=600, ge=30)

    @field_validator("tenants")
    @classmethod
    def _tenant_names(cls, tenants: dict[str, Tenant]) -> dict[str, Tenant]:
        for name in tenants:
            if not TENANT_NAME.fullmatch(name):
                raise ValueError(
                    f"tenant name {name!r}: 1-64 lowercase letters, digits, '-' or '_', starting "
                    "with a letter or digit (it names the tenant's folder in the store)"
                )
        return tenants

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _sentinel_list(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            return (
                json.loads(text)
                if text.startswith("[")
                else [a.strip() for a in text.split(",") if a.strip()]
            )
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinel_addresses(cls, sentinels: list[str]) -> list[str]:
        for address in sentinels:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"Sentinel {address!r}: host:port, as in redis-sentinel-1:26379")
        return sentinels

    @model_validator(mode="after")
    def _sentinel_data_nodes(self) -> Self:
        if self.redis_sentinels and not self.redis_url.startswith(("redis://", "rediss://")):
            raise ValueError(
                "with FLEET_REDIS_SENTINELS, FLEET_REDIS_URL must be redis[s]://[user:password@]host/db: "
                "it gives the data nodes' database, password and TLS options"
            )
        return self

    @model_validator(mode="after")
    def _webhook_retries_end_before_redelivery(self) -> Self:
        longest_s = self.webhook_retry_cap_s + self.webhook_timeout_s
        if longest_s >= self.webhook_visibility_timeout_s:
            raise ValueError(
                f"webhook_retry_cap_s + webhook_timeout_s ({longest_s:g} s) must be below "
                f"webhook_visibility_timeout_s ({self.webhook_visibility_timeout_s} s), or the broker "
                "hands a delivery that is waiting to retry to a second worker: lower the cap or "
                "raise the visibility timeout"
            )
        return self

    @model_validator(mode="after")
    def _retention_outlives_its_readers(self) -> Self:
        # A job record must never point at deleted outputs, and a job that may still run must
        # find its inputs: refuse settings that would delete either first.
        day_s = 24 * 3600
        if self.retention_outputs_days * day_s <= self.job_ttl_s:
            raise ValueError(
                f"FLEET_RETENTION_OUTPUTS_DAYS ({self.retention_outputs_days}) must be longer than "
                f"FLEET_JOB_TTL_S ({self.job_ttl_s} s): a job's record would point at deleted "
                "outputs; lower FLEET_JOB_TTL_S with it"
            )
        longest_run_s = self.max_wait_s + self.max_attempts * self.max_run_s
        for kind, days in (("INPUTS", self.retention_inputs_days), ("LORAS", self.retention_loras_days)):
            if days * day_s <= longest_run_s:
                raise ValueError(
                    f"FLEET_RETENTION_{kind}_DAYS ({days}) must be longer than a job can wait and "
                    f"run ({longest_run_s} s: FLEET_MAX_WAIT_S + FLEET_MAX_ATTEMPTS x FLEET_MAX_RUN_S): "
                    f"a job would lose its {kind.lower()} before it ran"
                )
        return self

    def weights_for(self, model_key: str, hub_id: str) -> str:
        if self.weights_cache_dir is not None and (self.weights_cache_dir / model_key).is_dir():
            return str(self.weights_cache_dir / model_key)
        if model_key in self.weights:
            return self.weights[model_key]
        if self.model_root is not None:
            return str(self.model_root / model_key)
        return hub_id


def switched(setting: str, auto: bool) -> bool:
    """An ``auto``/``on``/``off`` setting (FLEET_FP8, FLEET_TF32...): on, off, or ``auto``'s value
    (the model's speed profile)."""
    return {"auto": auto, "on": True, "off": False}[setting]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
