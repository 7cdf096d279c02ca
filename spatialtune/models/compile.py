"""A whole model compiled with chosen kernels: the records a share gets, and the build.

:func:`records_for` picks each task's kernel for a share from the tuning database (the fastest
measured there, optionally falling back to another share's); :func:`compile_model` builds the
model with them as a Relax VM executable. Both serve every place a model is compiled: the
end-to-end runs (:mod:`.e2e`), ``model export`` (:mod:`.export`) and the models a GPU bundle
carries (:mod:`.share_export`).

Compilation is ``compile_relax``'s pipeline spelled out: legalize and fuse (:func:`.importer.fuse`,
the passes the tasks were extracted with, so the database's workloads match structurally),
``MetaScheduleApplyDatabase`` with a MetaSchedule database holding the chosen configs, then only
Relax's lowering and finalization (running the whole default pipeline again would fuse the tuned
functions into new ones). The functions the database scheduled are counted, not assumed. On a GPU
target every function the database did not schedule gets TVM's default GPU schedules (the
``dlight`` rules TVM's own CUDA pipeline applies): an unscheduled function does not build for a
GPU at all. A CUDA library is exported with its kernels as cubins (:mod:`spatialtune.cuda.embed`),
so a runtime-only TVM loads it without a compiler.
"""

from __future__ import annotations

import logging
from typing import Sequence

from ..device import DeviceInfo, target_for
from ..search.policy import winner_origins
from ..store.database import TuningDatabase
from ..terms import Condition, norm_ratio
from ..workloads.schedule import apply_trace
from ..workloads.spec import Workload
from .importer import ImportedModel, fuse

log = logging.getLogger(__name__)


def records_for(db: TuningDatabase, tasks: Sequence[Workload], device: DeviceInfo, partition: str, ratio: float,
                interference: str = "none", *, fallback_ratio: float | None = None, pick=None):
    """A MetaSchedule MemoryDatabase with each task's best config under (device, partition, ratio,
    interference), and the per-task facts: {key: {name, weight, time_s, mod_hash, trials, origin,
    tuned_ratio}} (``trials``: the budget spent at this share, the winners matrix's measurements
    left out; ``origin``: where the best kernel was found, :class:`~spatialtune.search.policy.Origin`;
    ``tuned_ratio``: the share whose record was taken).

    The best config is the fastest kernel measured at this share, its own search's or another
    share's winner measured here by the matrix, so a share-tuned model is never built from a
    kernel slower at this share than the 100 % winners measured there. ``fallback_ratio``: a task
    with no record at this share takes its best at that share instead (the whole device's, where
    the share was never tuned), and its facts say so. ``pick(workload, rows)``, if given, chooses
    among a task's ok measurements at this share instead (:class:`.cold.ColdPicker`), returning
    (the measurement, facts to add) or None to keep the fastest."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    msdb = ms.database.MemoryDatabase()
    target = tvm.target.Target(target_for(device))
    facts = {}
    for w in tasks:
        rows = db.measurements(workload_key=w.key, device_id=device.id, partition=partition)
        here = [m for m in rows if norm_ratio(m.ratio) == norm_ratio(ratio) and m.interference == interference]
        facts[w.key] = {"name": w.name, "weight": w.weight, "time_s": None, "mod_hash": None,
                        "trials": sum(m.source != "matrix" for m in here), "origin": None, "tuned_ratio": None}
        used, best = ratio, None
        for r in (ratio,) if fallback_ratio is None else (ratio, fallback_ratio):
            best = db.best(workload_key=w.key, device_id=device.id, partition=partition, ratio=r,
                           interference=interference)
            if best:
                used = r
                break
        if not best:
            continue
        chosen = pick(w, [m for m in here if m.status == "ok"]) if pick is not None and used == ratio else None
        if chosen is not None:
            best = [chosen[0]]
            facts[w.key] |= chosen[1]
        o = winner_origins(rows).get(Condition(partition, norm_ratio(used), interference))
        facts[w.key]["origin"] = o.label() if o else None
        if chosen is not None:  # the best's origin is not the pick's
            facts[w.key]["origin"] = f"out of cache: {chosen[1]['rank']} of the tuner's fastest"
        try:
            sch = apply_trace(w, best[0].trace)
        except Exception as e:  # a record of another TVM: the task runs untuned, and says so
            log.warning("%s: best config at %g%% does not replay (%s); untuned in this variant", w.key, used, e)
            continue
        mod = w.ir_module()
        msdb.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, msdb.commit_workload(mod), run_secs=[float(best[0].median_s)], target=target,
            args_info=ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
        facts[w.key] |= {"time_s": best[0].median_s, "mod_hash": best[0].mod_hash, "tuned_ratio": norm_ratio(used)}
    return msdb, facts


def compile_model(model: ImportedModel, target: dict, msdb=None, out: str | None = None,
                  tasks: Sequence[Workload] = (), report: dict | None = None) -> tuple[object, int]:
    """(the Relax executable, how many functions the database scheduled); exported to ``out``.

    On a CPU target the functions that are ``tasks`` using fast math (:attr:`Workload.fast_math`)
    are built with it, as their tuned candidates were (:mod:`spatialtune.workloads.fastmath`);
    the rest, and every function when ``tasks`` is empty (TVM's own build), keep exact math. On a
    GPU target the functions left unscheduled get TVM's default GPU schedules (see the module doc).
    ``report``, if given, receives ``tuned`` (the structural hashes of the functions the database
    scheduled), ``default`` (the names of those given a default GPU schedule) and, for a CUDA
    export, ``cuda`` (how each CUDA module was compiled)."""
    import tvm
    from tvm import relax
    from tvm.relax import pipeline

    from ..workloads.fastmath import rewrite
    from ..workloads.prefetch import rewrite as prefetch

    tgt = tvm.target.Target(target)
    gpu = target.get("kind") == "cuda"
    mod = fuse(model.relax_mod, target)
    fast = _fast_functions(mod, tasks) if target.get("kind") == "llvm" else set()
    applied = 0
    if msdb is not None:
        before = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
        with tgt, msdb, tvm.transform.PassContext(opt_level=3):
            mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        done = _scheduled(mod)
        applied = len(done)
        if report is not None:  # as the tasks are keyed: the functions before their schedules
            report["tuned"] = sorted(_hash(before[name]) for name in done if name in before)
    if fast:  # after the database: the records match the exact functions the tasks were extracted as
        mod = rewrite(mod, skip=lambda name, _: name not in fast)[0]
    if target.get("kind") == "llvm":  # as the builder built the tuned kernels (workloads.prefetch)
        mod = prefetch(mod)[0]
    if gpu:
        mod = _default_gpu_schedules(mod, tgt, report)
    try:
        passes = [*pipeline.dataflow_lower_passes(tgt), *pipeline.finalize_passes(tgt)]
    except (AttributeError, ValueError):  # the 0.27 wheel's CPU backend does not export them: the same list
        from tvm.relax.backend.cpu_generic import pipeline as cpu

        passes = [*cpu.dataflow_lower_passes(tgt), *cpu.finalize_passes(tgt)]
    lower = tvm.transform.Sequential(passes)
    with tgt, tvm.transform.PassContext(opt_level=3):
        ex = relax.build(mod, target=tgt, relax_pipeline=lower)
    if out is not None and gpu:
        from ..cuda.embed import export_with_cubins

        cuda = export_with_cubins(ex, out, target.get("arch") or "sm_90")
        if report is not None:
            report["cuda"] = cuda
    elif out is not None:
        ex.export_library(out)
    return ex, applied


def _scheduled(mod) -> dict[str, object]:
    import tvm

    return {gv.name_hint: f for gv, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "tirx.is_scheduled" in f.attrs}


def _hash(f) -> str:
    import tvm

    from ..workloads.schedule import mod_hash

    return mod_hash(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}))


def function_hashes(model: ImportedModel, target: dict) -> dict[str, str]:
    """{structural hash: function name} of the fused model's PrimFuncs: which task each is."""
    import tvm

    mod = fuse(model.relax_mod, target)
    return {_hash(f): gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def _default_gpu_schedules(mod, tgt, report: dict | None):
    """TVM's CUDA pipeline's default schedules (``dlight``) for the functions not yet scheduled."""
    from tvm.s_tir import dlight as dl

    before = set(_scheduled(mod))
    with tgt:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                                      dl.gpu.Fallback())(mod)
    if report is not None:
        report["default"] = sorted(set(_scheduled(mod)) - before)
    return mod


def _fast_functions(mod, tasks: Sequence[Workload]) -> set[str]:
    """Names of the fused module's PrimFuncs that are a task with fast math, found by the
    structural hash the task was keyed by (its function as extraction names it, ``main``)."""
    import tvm

    want = {w.prim.hash for w in tasks if w.fast_math}
    if not want:
        return set()
    return {gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and _hash(f) in want}
