"""The measuring worker's side of a bundle's models: load each variant once, check its outputs,
then time it one slot at a time, interleaved with the other variants by the caller.

The worker already holds the share (:func:`.in_worker.init_measure_worker`: a CPU core set, an
MPS client or a green context), so every variant loaded here runs under it. A variant is a
Relax VM executable exported with its kernels as cubins (:mod:`spatialtune.cuda.embed`; loading
compiles nothing) or ONNX Runtime on the bundle's skeleton of the model; both get the inputs and
the weights drawn from the manifest's seed (:mod:`.model_inputs`) and are checked against the
reference outputs computed on the CPU host before any timing. A wrong variant is never timed.

A slot (:func:`time_slot`) is one untimed call, then whole calls for at least ``min_repeat_ms``
(at least one), each ending with a device synchronisation: the time per call of that variant in
that round. Only a variant's check and its slots' times leave the worker, never its outputs.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from .in_worker import slot_time, warm_up
from .model_inputs import drawn_weights, random_inputs, sample

_loaded: dict[str, Callable[[], Any]] = {}


def _tvm(device: str):
    if device == "cuda":
        from ..cuda.tvm_runtime import import_tvm

        return import_tvm()
    import tvm

    return tvm


def _check(outputs: list[np.ndarray], spec: dict) -> tuple[float, str | None]:
    """(worst relative error, what is wrong or None) of the outputs against the reference file."""
    from ..workloads.check import check_output

    with np.load(spec["reference"]) as ref:
        refs = [ref[f"o{i}"] for i in range(len(spec["strides"]))]
    if len(outputs) != len(refs):
        return float("inf"), f"{len(outputs)} outputs, the reference has {len(refs)}"
    worst = 0.0
    for i, (o, r, stride) in enumerate(zip(outputs, refs, spec["strides"])):
        got = sample(o, stride)
        if got.shape != r.shape:
            return float("inf"), f"output {i}: {got.size} sampled values, the reference has {r.size}"
        err, wrong = check_output(got, r.astype(np.float64), {"float16": "fp16"}.get(str(r.dtype), "fp32"))
        worst = max(worst, err)
        if wrong:
            return worst, f"output {i}: {wrong.replace('the float64 reference', 'the reference')}"
    return worst, None


def _flat(out) -> list[np.ndarray]:
    if isinstance(out, (tuple, list)) or type(out).__name__ in ("Array", "List", "Tuple"):
        return [x for o in out for x in _flat(o)]
    return [out.numpy() if hasattr(out, "numpy") else np.asarray(out)]


def _ready(name: str, call: Callable[[], Any], outputs: list[np.ndarray], spec: dict, settings: dict,
           t0: float) -> dict:
    """Check, then (if right) keep the variant for its slots and warm it up."""
    from .in_worker import granted_units

    load_s = time.perf_counter() - t0
    if spec.get("device") == "cuda":  # the variant ran in this worker's share, not a context of its own
        from ..cuda.green import check_green_current

        check_green_current()
    err, wrong = _check(outputs, spec)
    res = {"load_s": load_s, "rel_err": err, "granted_units": granted_units()}
    if wrong:
        return res | {"status": "wrong_result", "error": wrong}
    _loaded[name] = call
    warm_up(call, settings.get("warmup_ms", 100))
    return res | {"status": "ok"}


def load_vm(name: str, library: str, spec: dict, settings: dict) -> dict:
    """Load the exported Relax VM executable ``library`` as variant ``name`` on ``spec["device"]``:
    its weights transformed once (``main_transform_params``), its outputs checked, its warm-up."""
    device = spec.get("device", "cpu")
    tvm = _tvm(device)
    from tvm.runtime.vm import VirtualMachine

    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
    t0 = time.perf_counter()
    vm = VirtualMachine(tvm.runtime.load_module(library), dev)
    args = [tvm.runtime.tensor(x, dev) for x in random_inputs(spec["inputs"], spec["seed"])]
    weights = [tvm.runtime.tensor(w, dev) for w in drawn_weights(spec["params"], spec["seed"])]
    if spec["params"]:
        args += list(vm["main_transform_params"](weights))
    main = vm["main"]

    def call():
        out = main(*args)
        dev.sync()
        return out

    try:
        outputs = _flat(call())
    except Exception as e:
        _poisoned(device, e)
        raise
    return _ready(name, call, outputs, spec, settings, t0)


def load_onnxruntime(name: str, skeleton: str, spec: dict, settings: dict) -> dict:
    """ONNX Runtime on ``spec["provider"]`` as variant ``name``: the skeleton model (its large
    weights left out) with the drawn weights handed in as its initializers."""
    import onnxruntime as ort

    t0 = time.perf_counter()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if spec.get("threads"):
        so.intra_op_num_threads = int(spec["threads"])
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    names = [p.get("onnx", p["name"]) for p in spec["params"]]  # as the ONNX file names them
    if names:
        values = [ort.OrtValue.ortvalue_from_numpy(w) for w in drawn_weights(spec["params"], spec["seed"])]
        so.add_external_initializers(names, values)
    sess = ort.InferenceSession(skeleton, so, providers=[spec["provider"]])
    feeds = dict(zip([i["name"] for i in spec["inputs"]], random_inputs(spec["inputs"], spec["seed"])))
    if spec["provider"] not in sess.get_providers():
        return {"status": "unavailable", "error": f"{spec['provider']} did not take the session"}
    spec = spec | {"device": "cpu" if spec["provider"] == "CPUExecutionProvider" else "cuda"}
    if spec["provider"] == "CPUExecutionProvider":
        outputs = [np.asarray(o) for o in sess.run(None, feeds)]
        return _ready(name, lambda: sess.run(None, feeds), outputs, spec, settings, t0) | {"version": ort.__version__}
    # On a GPU the inputs and outputs stay on the device, as the TVM variants' do: no copies timed.
    binding = sess.io_binding()
    for n, x in feeds.items():
        binding.bind_ortvalue_input(n, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    for o in sess.get_outputs():
        binding.bind_output(o.name, "cuda")

    def call():
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()

    call()
    outputs = [np.asarray(o) for o in binding.copy_outputs_to_cpu()]
    return _ready(name, call, outputs, spec, settings, t0) | {"version": ort.__version__}


def onnxruntime_providers() -> dict:
    """ONNX Runtime's execution providers in this worker's python, or why there are none."""
    try:
        import onnxruntime as ort
    except Exception as e:  # ImportError, or a broken install
        return {"status": "unavailable", "error": f"onnxruntime cannot be imported here ({type(e).__name__})"}
    return {"status": "ok", "providers": list(ort.get_available_providers()), "version": ort.__version__}


def time_slot(name: str, settings: dict) -> dict:
    """One round's time per call of the loaded variant ``name`` (see the module doc)."""
    return {"time_s": slot_time(_loaded[name], settings.get("min_repeat_ms", 50))}


def unload(name: str | None = None) -> None:
    """Drop variant ``name`` (every variant when None), freeing its device memory."""
    if name is None:
        _loaded.clear()
    else:
        _loaded.pop(name, None)


def _poisoned(device: str, exc: BaseException) -> None:
    if device == "cuda":
        from ..cuda.tvm_runtime import die_if_poisoned

        die_if_poisoned(exc)
