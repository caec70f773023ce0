"""Weights that arrive: from the hub once, into the fleet's object store, onto each node once.

    python -m worker.weights pull MODEL     the hub -> a local folder (the files the pipeline loads)
    python -m worker.weights mirror MODEL   that folder -> weights/<model>/<revision>/ in the store
    python -m worker.weights fill MODEL...  the store -> the node cache (FLEET_WEIGHTS_CACHE_DIR)

A worker with a node cache fills it before loading a model (``local_weights``), so the first
worker on a node reads the store and every later one, on any pod, reads the node's disk.
``files`` says which files and the manifest; ``hub``, ``mirror`` and ``fill`` do the moving.
"""

from __future__ import annotations

import logging

from routing.catalog import ModelSpec
from routing.io.storage import Storage
from routing.settings import Settings
from worker.weights.fill import MirrorMissing, fill

log = logging.getLogger(__name__)


def local_weights(settings: Settings, spec: ModelSpec, storage: Storage) -> str:
    """The weights a worker loads ``spec`` from: with a node cache and a mirror of the model in
    the store, the node's copy, filled and checked first; else what the settings name
    (``Settings.weights_for``)."""
    if settings.weights_cache_dir is not None:
        try:
            report = fill(
                storage,
                spec,
                settings.weights_cache_dir,
                chunk_bytes=settings.weights_fill_chunk_bytes,
                threads=settings.weights_fill_threads,
            )
            return str(report.folder)
        except MirrorMissing as e:
            log.warning("%s; loading %s as configured", e, spec.key)
    return settings.weights_for(spec.key, spec.hub_id)
