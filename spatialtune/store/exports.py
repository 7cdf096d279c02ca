"""The on-disk format of a model export (``spatialtune model export``): written by
:mod:`spatialtune.models.export`, read by :mod:`spatialtune.lookup.models`. Constants only, so
the lookup library reads them without importing anything heavy."""

FORMAT = "spatialtune-model-export"
VERSION = 1
MANIFEST = "manifest.json"
