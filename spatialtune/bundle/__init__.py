"""Measurement bundles: search and build on a CPU host, measure on a GPU host, import back.

A GPU host may have no package index and only a runtime-only TVM, numpy and cuda-bindings. So:

- :mod:`.build` (CPU host, full TVM): candidates chosen by the search policy, each built to an
  exported ``.so`` plus a cubin, the neighbour kernels' cubin, the green-context shim, and
  ``manifest.json`` (workload specs, traces, mod hashes, features, which conditions each
  candidate is for, target and arch).
- :mod:`.run` (GPU host): measures the candidates under a list of conditions with the same
  runner and workers as ``tune`` and writes ``results.json`` after each condition. Imports no
  database, xgboost or full TVM.
- :mod:`.importer` (CPU host): records everything in the tuning database and retrains the
  per-share cost models, so the next round (``build --db``) starts from these measurements.

A bundle can also be built for this host's cores (``target="cpu"``, conditions ``cpu:RATIO``):
the same build, run, import and next round, without a GPU (what the round-trip tests use).
"""

FORMAT = 1
