"""Capacity planning and the fleet simulation (``python -m routing plan``, ``bench/``); nothing at
run time imports these. ``data/`` holds GPU-seconds per job and instance prices."""
