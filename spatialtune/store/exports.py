"""The on-disk format of a model export (``spatialtune model export``): written by
:mod:`spatialtune.models.export`, read by :mod:`spatialtune.lookup.models`. Constants and the
rule for which compile a share ships, with no imports, so the lookup library reads them without
importing anything heavy."""

FORMAT = "spatialtune-model-export"
VERSION = 1
MANIFEST = "manifest.json"

NOISE = 0.03
"""How much faster the 100%-tuned compile must have run than the share-tuned one, in the same
interleaved rounds of one run, for a share to ship it (and for a latency answer to be that
compile's): the run-to-run spread of those timings (docs/models.md, *How the variants are timed*)."""


def whole_outran(share_tuned: dict, whole_tuned: dict) -> bool:
    """Whether one run's 100%-tuned compile ran faster than its share-tuned one by more than
    :data:`NOISE` at a share (two ``model_runs`` rows as dicts, both ``ok``): the rule by which
    ``model export`` ships it there and a latency answer is of it."""
    return bool(share_tuned["run"] == whole_tuned["run"]
                and share_tuned["status"] == whole_tuned["status"] == "ok"
                and share_tuned["latency_s"] and whole_tuned["latency_s"]
                and whole_tuned["latency_s"] < share_tuned["latency_s"] * (1 - NOISE))
