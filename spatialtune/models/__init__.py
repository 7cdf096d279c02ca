"""Models in, per-share kernels and end-to-end latency out.

:mod:`.importer`: an ONNX file through TVM Relax, its tuning tasks as PrimFunc workloads (the
search space ``spatialtune workloads --from-onnx`` writes). :mod:`.e2e`: the whole model compiled
with the kernels tuned for a share, with those tuned for 100 %, and untuned, each run under the
share next to ONNX Runtime confined to the same cores (``spatialtune model``). :mod:`.export`: the
model compiled once per share, with a manifest, for schedulers (``spatialtune model export``;
``spatialtune.lookup.ModelLookup`` reads it). See docs/models.md.
"""
