"""Runtime lookup for schedulers: which tuned kernel for the share (and neighbour) just granted.

``Lookup`` answers from an immutable in-memory index of the database's best configs, in about a
microsecond, with fallback rules; ``apply.build_kernel`` turns an answer into a runnable module;
``metaschedule.export_metaschedule`` writes the answers at one share for TVM's own pipelines;
``ModelLookup`` picks a compiled model per granted share from a ``spatialtune model export``
directory, and ``share_for_latency`` the smallest share whose measured latency meets a target.
Importing this package loads neither TVM nor sqlite-utils.
"""

from .index import LookupResult
from .model_latency import LatencyAnswer, share_for_latency
from .models import ModelAnswer, ModelLookup
from .service import Lookup, get_lookup, key_for

__all__ = ["Lookup", "LookupResult", "get_lookup", "key_for", "ModelLookup", "ModelAnswer", "LatencyAnswer",
           "share_for_latency"]
