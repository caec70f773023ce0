"""What the tests, the demo and the benchmarks run the fleet with, and the product never ships:
``pip install .`` and its extras leave it out, no image copies it; the ``dev`` extra's editable
install (``make``) has it.

* ``small_models``: small random-weight copies of the catalog's pipelines, and small LoRAs for
  them (``python -m testkit.small_models --out DIR``);
* ``s2v``: S2V on the small checkpoint and on a CPU (``s2v.GROUP_MODEL``, a group model named in
  ``settings.group_adapters``);
* ``storage`` and ``slow_worker``: a worker whose object store is slow.
"""
