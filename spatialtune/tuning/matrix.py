"""What ``tune`` measures beyond a key's search: the winners matrix, imported configs and
uniform samples.

Both are reference measurements, read from the database each time (so a resumed job measures
only what is missing) and made through the job's own build-and-measure step (``job.measure``),
so every one passes the output check and the same after-batch steps (:mod:`.after_batch`)
as a search batch: it is recorded the moment it exists.
"""

from __future__ import annotations

import logging

from ..search.policy import missing_winners
from ..search.space import candidate_from_trace
from ..terms import Share
from ..workloads.spec import Workload
from .after_batch import Batch

log = logging.getLogger(__name__)


def fill_matrix(job, w: Workload) -> None:
    """The winners matrix of ``w`` on this partition: each condition's ``matrix_top`` fastest
    kernels measured under every other condition measured so far (every share, every
    neighbour), so that a cell's best is the fastest kernel measured there whichever condition
    found it and whichever order they were tuned in. Read from the database each time, so a
    resumed job measures only what is missing. Reference measurements, beyond the budget."""
    for _ in range(4):  # a kernel from elsewhere can enter a cell's top: measure until none is new
        rows = job.db.measurements(workload_key=w.key, device_id=job.device.id,
                                    partition=job.partition.kind, with_features=True)
        todo = missing_winners(rows, job.opt.matrix_top)
        measured = 0
        for k, configs in sorted(todo.items(), key=lambda kv: (-kv[0].ratio, kv[0].interference)):
            if job.out_of_time():
                return
            share = job.partition.grant(k.ratio)
            if share.key_ratio != k.ratio:  # a key this partition cannot grant again exactly
                job.stage.gaps.append(f"{w.name or w.key} @ {k.ratio:g}% {k.interference}: {len(configs)} winners "
                                 f"not measured (this partition cannot grant {k.ratio:g}% again exactly)")
                log.info("%s", job.stage.gaps[-1])
                continue
            key = job.key(w.key, k)
            taken = job.ctx.pending_at(key)  # handed to a deferred runner already: not twice
            cands = [c for m in configs if m.mod_hash not in taken
                     and (c := candidate_from_trace(w, m.trace, "matrix", m.features, m.mod_hash)) is not None]
            if cands:
                log.info("%s @ %g%% %s: measuring %d winners of other conditions", w.key, k.ratio,
                         k.interference, len(cands))
                job.measure(Batch(w, share, key, cands, "matrix"))
                measured += len(cands)
        if not measured:
            return


def check_imported(job, w: Workload, share: Share, key: dict) -> None:
    """Measure the key's ``unchecked`` rows (imported, never output-checked) before anything
    else: each checked measurement replaces its imported row, so an unchecked time is never
    an answer, a seed or a training row. Part of the budget already (they were counted)."""
    if not job.runner.real:
        return
    rows = job.db.measurements(**key, status="unchecked", with_features=True)
    cands = [c for m in rows if (c := candidate_from_trace(w, m.trace, "import", m.features,
                                                           m.mod_hash)) is not None]
    if cands and not job.out_of_time():
        log.info("%s @ %g%%: checking %d imported configs", w.key, share.key_ratio, len(cands))
        job.measure(Batch(w, share, key, cands, "import"))


def measure_samples(job, w: Workload, share: Share, key: dict) -> None:
    """``opt.samples`` of ``w`` (by name or key): that many uniform samples of its design space,
    none measured on the device before, measured under ``key`` (source ``uniform``)."""
    n = max([v for name, v in job.opt.samples.items() if name in (w.key, w.name)], default=0)
    if not n or job.out_of_time():
        return
    from ..search.uniform import UniformSampler

    seen = {m.mod_hash for m in job.db.measurements(workload_key=w.key, device_id=job.device.id)}
    seen |= job.ctx.pending_at(key)
    cands = UniformSampler(w, job.target(share), seed=job.opt.seed, exclude=seen).ask(n)
    for c in cands:
        c.source = "uniform"
    log.info("%s @ %g%%: %d uniform samples of the design space", w.key, share.key_ratio, len(cands))
    if cands:
        job.measure(Batch(w, share, key, cands, "uniform"))
