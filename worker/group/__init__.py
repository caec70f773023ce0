"""The resident multi-GPU group: torchrun ranks that load their models once and serve jobs.

* ``rank`` - one rank (``torchrun -m worker.group``); rank 0 talks to the supervisor
* ``supervisor`` - the Celery pool child's side: starts torchrun, runs jobs on it, kills it whole
* ``adapter`` - ``GroupAdapter``, how the worker's pool serves a group model, and the process's group
* ``protocol`` - the typed messages between supervisor and rank 0
* ``spec`` - what the supervisor tells the ranks at start, and where each rank runs (``GroupPlace``)
* ``files`` - the job's inputs and outputs as files in the job's directory
* ``rank_errors`` - a rank's own error mid-job, written by it and watched for by the supervisor
* ``torchrun_log`` - which rank failed, from torchrun's output
"""

from worker.group.spec import GroupPlace

__all__ = ["GroupPlace"]
