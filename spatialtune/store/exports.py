"""The on-disk format of a model export (``spatialtune model export``): written by
:mod:`spatialtune.models.export`, read by :mod:`spatialtune.lookup.models`. Constants only, so
the lookup library reads them without importing anything heavy."""

FORMAT = "spatialtune-model-export"
VERSION = 1
MANIFEST = "manifest.json"

NOISE = 0.03
"""How much faster the 100%-tuned compile must have run than the share-tuned one, in the same
interleaved rounds of one run, for a share to ship it (and for a latency answer to be that
compile's): the run-to-run spread of those timings (docs/models.md, *How the variants are timed*)."""
