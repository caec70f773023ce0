"""Store keys of a tenant's media: where its uploads and fetched inputs are stored, and which keys
its requests may name.

The kind comes first, so that a bucket lifecycle rule can match one kind by prefix:

    uploads/<tenant>/<hex>.<ext>               POST /v1/uploads, Client.upload
    inputs/<tenant>/<job id>/<field>.<ext>     media a request gave by URL
    loras/<tenant>/<sha256>.safetensors        a checked LoRA a request named
    jobs/<job id>/...                          the job's outputs

A request may name a key under its own tenant's ``uploads/`` or ``inputs/``, or under ``jobs/`` of
a job of the same tenant. Every other key is answered as a missing one is, so a tenant cannot
read another's files, nor learn which keys exist.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from routing.errors import FieldError, InvalidRequest
from routing.settings import NO_TENANT, TENANT_NAME


def check_tenant(tenant: str) -> str:
    """``tenant`` if it can name a folder in the store ('' is the SDK's no-tenant); raises
    ``InvalidRequest`` otherwise."""
    if tenant and not TENANT_NAME.fullmatch(tenant):
        raise InvalidRequest(
            [
                FieldError(
                    "tenant", "1-64 lowercase letters, digits, '-' or '_', starting with a letter or digit"
                )
            ]
        )
    return tenant


def folder(tenant: str) -> str:
    return tenant or NO_TENANT


def upload_key(tenant: str, ext: str) -> str:
    return f"uploads/{folder(tenant)}/{uuid.uuid4().hex}.{ext}"


def lora_key(tenant: str, sha256: str) -> str:
    """Where a checked LoRA of ``tenant`` is stored, by its content's digest."""
    return f"loras/{folder(tenant)}/{sha256}.safetensors"


def input_prefix(tenant: str, job_id: str) -> str:
    """Where the media a job was given by URL is stored."""
    return f"inputs/{folder(tenant)}/{job_id}/"


@dataclass(frozen=True)
class KeyScope:
    """The keys one tenant's requests may name. ``job_tenant`` gives the tenant of a job by id
    (None when there is no such job: its record expired, or it never was)."""

    tenant: str
    job_tenant: Callable[[str], str | None]

    def may_read(self, key: str) -> bool:
        kind, _, rest = key.partition("/")
        if kind in ("uploads", "inputs"):
            return rest.startswith(f"{folder(self.tenant)}/")
        if kind == "jobs":
            job_id = rest.partition("/")[0]
            return bool(job_id) and self.job_tenant(job_id) == self.tenant
        return False
