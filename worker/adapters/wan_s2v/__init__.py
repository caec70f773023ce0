"""The official Wan2.2 S2V code (PyPI ``wan22``, importable as ``wan``) made to run in the fleet.

Nothing of the package's source is copied here: what it needs is done to its modules, each a
module attribute replaced (``patch.Patch``), never a file changed. One module per concern:

* ``official``: imports the modules S2V uses and applies the patches every device needs, after
  checking the pinned ``wan22`` version and that every attribute any table here replaces exists;
* ``attention``: the SDPA kernel that stands in for flash-attn;
* ``standins``: what stands in for the media libraries the official code imports (librosa,
  decord, torchvision), on PyAV and Pillow;
* ``progress``: per-step reports out of the denoising loop, only while a job runs.

``worker.adapters.s2v`` is the model built on them.
"""
