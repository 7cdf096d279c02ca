"""Measurement bundles: tune on a CPU host, measure on a GPU host, import back.

A GPU host may have no package index and only a runtime-only TVM, numpy and cuda-bindings. So a
GPU round is ``tune`` (the one tuning loop, :mod:`spatialtune.tuning`) with a deferred runner,
and this package holds what is particular to bundles only:

- :mod:`.pack` (CPU host, full TVM): :class:`~.pack.BundleRunner`, the deferred runner. ``tune``
  chooses and builds each batch as it always does; the runner packs it (the exported ``.so``
  and cubin of each kernel, the conditions it is for, its trace and features; the neighbour
  kernels' cubin, the green-context shim, PrimFunc references; ``manifest.json``) and reports
  the batch as pending.
- :mod:`.run` (GPU host): measures the candidates under a list of conditions with the same
  runner and workers as ``tune`` (outputs checked against the references there) and writes
  ``results.json`` after each condition. Imports no database, xgboost or full TVM.
- :mod:`.models` (GPU host): the whole models a bundle carries (``bundle models``, compiled per
  share on the CPU host by :mod:`spatialtune.models.share_export`), end to end under each
  condition in the same worker, variants timed in interleaved rounds.
- :mod:`.importer` (CPU host): records everything in the tuning database, so the same round
  made again (``bundle build --db``) continues from these measurements; model runs become
  ``model_runs`` rows.
- :mod:`.estimate`: the device time a run will take, per part, before it starts.

A bundle can also be built for this host's cores (``target="cpu"``, conditions ``cpu:RATIO``):
the same round, run and import, without a GPU (what the round-trip tests use).
"""

FORMAT = 1
