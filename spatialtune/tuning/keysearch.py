"""The search of one (workload, share) key inside ``tune``: its policy, the transfers still to
measure, and one batch per step."""

from __future__ import annotations

import logging
import time
from typing import Sequence

from ..device import target_for
from ..errors import first_line
from ..search.policy import SharePolicy
from ..terms import Share
from ..workloads.spec import Workload
from .after_batch import Batch, times_of

log = logging.getLogger(__name__)


class KeySearch:
    """One batch per :meth:`step`: built and measured, then the after-batch steps (recorded, the
    share's model retrained, the progress line), then the policy told the times.

    With a deferred runner a batch's times come later. The transfers are chosen from what other
    shares measured already, so a search batch still follows them in the same call; the batch
    after a search batch would be asked of a policy that has not heard of the last one, so the
    key stops there (the next ``tune`` call goes on from the database)."""

    def __init__(self, job, w: Workload, share: Share, key: dict, siblings: Sequence[tuple] = (), *,
                 position: tuple | None = None, budget_keys: Sequence[dict] = ()):
        """``position``, ``budget_keys``: the progress line's (:class:`.after_batch.Batch`)."""
        t0 = time.perf_counter()
        self.job, self.w, self.share, self.key = job, w, share, key
        self.position, self.budget_keys = position, budget_keys
        r = share.key_ratio
        rows = job.db.measurements(workload_key=w.key, device_id=job.device.id, with_features=True)
        model = job.models.model_for(r)  # the share's, retrained after each batch (.after_batch.Retrain)
        self.policy = SharePolicy(w, target_for(job.device, share.units),
                                  job.condition(r), rows, model,
                                  share_units=(share.units, share.total), options=job.opt.policy(),
                                  run=job.opt.search_run())
        job.stage.add("setup", time.perf_counter() - t0)
        taken = job.ctx.pending_at(key)
        self.transfers = [c for c in self.policy.transfers(siblings) if c.mod_hash not in taken]

    def step(self, want: int) -> bool:
        """Measure the next batch, at most ``want`` candidates (all waiting transfers first);
        False when the search space is exhausted or the next batch waits on pending results."""
        job = self.job
        t0 = time.perf_counter()
        transfers = bool(self.transfers)
        if transfers:
            cands, self.transfers = self.transfers[:want], self.transfers[want:]
        else:
            try:
                cands = self.policy.ask(min(job.opt.batch, want))
            except Exception as e:  # a search failing inside TVM costs this key its trials, not the job
                job.stage.add("search", time.perf_counter() - t0)
                log.error("%s @ %g%%: the search failed (%s: %s); no more trials for this key", self.w.key,
                          self.share.key_ratio, type(e).__name__, first_line(e))
                return False
        job.stage.add("search", time.perf_counter() - t0)
        if not cands:
            log.info("%s @ %g%%: search space exhausted", self.w.key, self.share.key_ratio)
            return False
        results = job.measure(Batch(self.w, self.share, self.key, cands, "search", self.position, self.budget_keys))
        if any(r.status == "pending" for r in results):
            return transfers
        self.policy.tell(cands, times_of(results))
        return True

    def close(self) -> None:
        self.policy.close()
