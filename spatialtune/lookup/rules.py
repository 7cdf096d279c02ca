"""The share rule every lookup uses, kernels and compiled models alike.

Given the shares something was tuned for and the share a caller was granted, pick one:

1. ``exact``: tuned for exactly the granted share;
2. ``below``: the largest tuned share under the granted one. A kernel tuned for fewer cores or
   SMs than it gets leaves some idle but keeps its tiling: on a CPU core set its threads each get
   a core of their own, on a GPU its grid was sized for fewer SMs and still runs;
3. ``above``: the smallest tuned share over the granted one. Last, because a kernel tuned for more
   units oversubscribes the share: on a CPU its thread count is the tuned share's cores, so two
   threads share a core; the nearest share above oversubscribes least (a 2-core kernel on 1 core
   before an 8-core one);
4. ``miss``: nothing tuned at all.

Pure and allocation-light: the lookup calls it on every uncached request.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Sequence

SHARE_MATCHES = ("exact", "below", "above", "miss")


def nearest_share(tuned: Sequence[float], asked: float) -> tuple[int, str]:
    """Index into ``tuned`` (ascending, no duplicates) of the share to use for ``asked``, and the
    rule that picked it; ``(-1, "miss")`` when ``tuned`` is empty."""
    i = bisect_right(tuned, asked)
    if i and tuned[i - 1] == asked:
        return i - 1, "exact"
    if i:
        return i - 1, "below"
    if tuned:
        return 0, "above"
    return -1, "miss"
