"""Wan-Animate's official preprocessing (``wan/modules/animate/preprocess`` of PyPI ``wan22``) made
to run in the fleet: a photo and a driving video become the pose, face, background and mask videos
``WanAnimatePipeline`` takes.

Nothing of the package's source is copied here; what it needs is done to its modules, each a
module attribute replaced (``worker.adapters.wan_s2v.patch.Patch``), never a file changed:

* ``official``: imports the preprocessing modules with stand-ins for the libraries the fleet does
  not install (decord, moviepy, loguru), checks every attribute its tables replace, applies them;
* ``preprocess``: runs the official ``ProcessPipeline`` on a job's inputs, on the job's device,
  with its results kept by the inputs' content hashes.
"""
