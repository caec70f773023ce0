"""The fleet's processes as children of one script on one host: a worker (``process.WorkerProcess``),
the HTTP API (``process.ApiProcess``), Flower (``flower.FlowerProcess``), each with the fleet's
settings in its environment (``process.settings_env``).

Used by ``scripts/demo.py``, ``bench/`` and ``tests/`` only, and not installed by ``pip install .``:
production runs the same commands under its own supervisor (``docker-compose.yml``,
``deploy/k8s``), so no runtime package imports this one.
"""
