"""Fast math on a CPU: a model's GELU task built with the vectorisable erf has no libm call left
and passes the output check against the exact float64 reference; a task whose fast build fails
that check falls back to exact math, and says why; the approximations' errors stay within what
docs/models.md states."""
import math
import re
import tomllib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper, save
from scipy import special

from spatialtune.measure.runner import RunSettings

CHECK = RunSettings(repeat=1, min_repeat_ms=1, warmup_ms=0)
# packed single-precision arithmetic on SSE/AVX/AVX-512 registers (x86-64 assembly, AT&T syntax)
PACKED = r"\bv?(?:fmadd|fnmadd|fmsub|mul|add|sub|div|min|max)\w*ps\s+%[xyz]mm"


def _const(name, value):
    return numpy_helper.from_array(np.array(value, dtype=np.float32), name)


def _save(path, nodes, inits, x=(8, 16), y=(8, 32)):
    g = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y))], inits)
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def gelu_model(path):
    """x[8,16] -> MatMul + Add -> GELU in its Erf form, x * 0.5 * (1 + erf(x / sqrt 2))."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["h1"]),
             helper.make_node("Div", ["h1", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["h1", "e1"], ["g"]),
             helper.make_node("Mul", ["g", "half"], ["y"])]
    return _save(path, nodes, [numpy_helper.from_array((rng.standard_normal((16, 32)) * 0.5).astype(np.float32), "w"),
                               numpy_helper.from_array((rng.standard_normal(32) * 0.5).astype(np.float32), "b"),
                               _const("sqrt2", math.sqrt(2)), _const("one", 1.0), _const("half", 0.5)])


def deep_exp_model(path):
    """y = exp(x / 2 - 89.5) * 1e38: exp's results are float32 subnormals, which libm's expf gets
    right and the fast exp (clamped at -88.38) does not."""
    nodes = [helper.make_node("Mul", ["x", "half"], ["a"]), helper.make_node("Sub", ["a", "shift"], ["s"]),
             helper.make_node("Exp", ["s"], ["e"]), helper.make_node("Mul", ["e", "big"], ["y"])]
    return _save(path, nodes, [_const("half", 0.5), _const("shift", 89.5), _const("big", 1e38)], y=(8, 16))


@pytest.fixture(scope="module")
def gelu(tmp_path_factory):
    from spatialtune.models.importer import extract_workloads, load_onnx

    path = gelu_model(tmp_path_factory.mktemp("gelu") / "gelu.onnx")
    (task,) = extract_workloads(load_onnx(path))
    return path, task


def _schedule(w):
    """The task with its elementwise blocks inlined into the last and that block's inner loop
    vectorised: a schedule whose GELU is a vector loop if its erf can be."""
    from tvm.s_tir import Schedule

    sch = Schedule(w.ir_module())
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    for b in blocks[1:-1]:
        sch.compute_inline(b)
    sch.vectorize(sch.get_loops(blocks[-1])[-1])
    return sch


def _vectorised(w):
    return _schedule(w).mod


def _asm(mod):
    import tvm

    tgt = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    return tvm.compile(mod, target=tgt).mod.inspect_source("asm")


def test_the_gelu_task_uses_fast_math_and_its_fast_build_is_vector_code(gelu):
    from spatialtune.workloads.fastmath import approximable, rewrite

    _, w = gelu
    assert w.name == "fused_matmul_add_divide_erf_add1_multiply_multiply1"
    assert w.fast_math and w.prim.exact_math == ""
    assert "T.erf(" in w.prim.script  # the task itself stays exact: its reference computes erf
    assert approximable(w.ir_module()) == {"erf": 1}
    mod = _vectorised(w)
    exact, fast = _asm(mod), _asm(rewrite(mod)[0])
    assert re.search(r"call\w*\s+erff\b", exact)  # TVM's own build: one libm call per element
    assert "erff" not in fast and not re.search(r"call\w*\s+\w*(erf|exp)", fast)
    # the polynomial is packed float arithmetic on vector registers
    packed = re.findall(PACKED, fast)
    assert len(packed) >= 10, packed


def test_the_fast_build_passes_the_check_against_the_exact_reference(gelu, tmp_path):
    import tvm

    from spatialtune.measure.builder import BuildInput, LocalBuilder
    from spatialtune.measure.in_worker import measure_one
    from spatialtune.workloads.prim import float64_script

    _, w = gelu
    # the reference computes the exact erf in float64, not the polynomial
    assert "T.erf(" in float64_script(w.prim) and "float32" not in float64_script(w.prim)
    cand = type("C", (), {"mod_json": tvm.ir.save_json(_vectorised(w)), "mod_hash": "gelu"})()
    with LocalBuilder(tmp_path, workers=1) as b:
        fast, exact = b.build([BuildInput.of(cand, w.key, w.fast_math), BuildInput.of(cand, w.key)], {"kind": "llvm"})
    assert fast.ok and exact.ok and fast.artifact != exact.artifact  # one kernel, two libraries
    # the library TVM builds imports libm's erff; the fast one does not
    assert b"erff" in open(exact.artifact, "rb").read() and b"erff" not in open(fast.artifact, "rb").read()
    for built in (fast, exact):
        res = measure_one(w.to_dict(), built.artifact, None, CHECK, 5)
        assert res["status"] == "ok", res
        assert 0 < res["rel_err"] < 1e-5


def tanh_gelu_model(path):
    """x[8,16] -> MatMul -> GELU in its tanh form, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))),
    the cube as ``Pow(h, 3)``, as PyTorch exports ``GELU(approximate="tanh")``."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Pow", ["h", "three"], ["p"]),
             helper.make_node("Mul", ["p", "k"], ["kp"]), helper.make_node("Add", ["h", "kp"], ["s"]),
             helper.make_node("Mul", ["s", "c"], ["sc"]), helper.make_node("Tanh", ["sc"], ["t"]),
             helper.make_node("Add", ["t", "one"], ["t1"]), helper.make_node("Mul", ["h", "t1"], ["g"]),
             helper.make_node("Mul", ["g", "half"], ["y"])]
    return _save(path, nodes, [numpy_helper.from_array((rng.standard_normal((16, 32)) * 0.5).astype(np.float32), "w"),
                               _const("three", 3.0), _const("k", 0.044715), _const("c", math.sqrt(2 / math.pi)),
                               _const("one", 1.0), _const("half", 0.5)])


def test_a_constant_power_becomes_multiplications_and_passes_the_check(tmp_path):
    """TVM lowers ``pow`` to libm's scalar ``powf`` per element; with a constant exponent of 3 the
    fast build multiplies instead, vectorised, and the task passes the check against the exact
    float64 reference (a power the table does not have keeps ``powf``)."""
    import tvm
    from tvm import tirx

    from spatialtune.measure.builder import build_one
    from spatialtune.measure.in_worker import measure_one
    from spatialtune.models.importer import extract_workloads, load_onnx
    from spatialtune.workloads.fastmath import approximable, rewrite

    (w,) = extract_workloads(load_onnx(tanh_gelu_model(tmp_path / "tanh_gelu.onnx")))
    assert w.fast_math and approximable(w.ir_module()) == {"pow": 1, "tanh": 1}
    mod = _vectorised(w)
    exact, fast = _asm(mod), _asm(rewrite(mod)[0])
    assert re.search(r"call\w*\s+powf\b", exact) and "powf" not in fast
    res = measure_one(w.to_dict(), build_one(tvm.ir.save_json(mod), {"kind": "llvm"}, str(tmp_path), "k", True)
                      ["artifact"], None, CHECK, 3)
    assert res["status"] == "ok" and res["rel_err"] < 1e-5, res
    x = tirx.Var("x", "float32")
    odd = tvm.IRModule({"main": tirx.PrimFunc([], tirx.Evaluate(tirx.pow(x, tirx.const(2.5, "float32"))))})
    assert approximable(odd) == {}


def test_a_task_whose_fast_build_fails_the_check_stays_exact_and_says_why(tmp_path, caplog):
    from spatialtune.measure.builder import build_one
    from spatialtune.measure.in_worker import measure_one
    from spatialtune.models.importer import extract_workloads, load_onnx
    from spatialtune.workloads.fastmath import probe
    from spatialtune.workloads.spacefile import format_space
    from spatialtune.workloads.spec import parse_space

    model = load_onnx(deep_exp_model(tmp_path / "deep_exp.onnx"))
    with caplog.at_level("WARNING"):
        (w,) = extract_workloads(model)
    assert not w.fast_math
    assert w.prim.exact_math.startswith("fast math fails the output check")
    assert "exact exp" in caplog.text
    assert probe(w.prim) == w.prim.exact_math
    # the exact build of the same task passes: the fallback is what runs
    import tvm

    built = build_one(tvm.ir.save_json(w.ir_module()), {"kind": "llvm"}, str(tmp_path), "exact", w.fast_math)
    assert measure_one(w.to_dict(), built["artifact"], None, CHECK, 1)["status"] == "ok"
    # recorded in the space file, and read back from it
    text = format_space("deep", "test", [w])
    assert 'exact_math = "fast math fails' in text
    (back,) = parse_space(tomllib.loads(text), "deep.toml").workloads
    assert back.prim.exact_math == w.prim.exact_math and not back.fast_math


def test_fast_math_can_be_turned_off(gelu):
    from spatialtune.models.importer import extract_workloads, load_onnx

    path, _ = gelu
    (w,) = extract_workloads(load_onnx(path), fast_math=False)
    assert not w.fast_math and w.prim.exact_math == "fast math turned off"


def test_softmax_layer_norm_and_tanh_tasks_pass_with_fast_math(tmp_path):
    from spatialtune.models.importer import extract_workloads, load_onnx
    from spatialtune.workloads.fastmath import approximable, rewrite

    nodes = [helper.make_node("Softmax", ["x"], ["s"], axis=-1),
             helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["n"], axis=-1),
             helper.make_node("Tanh", ["n"], ["y"])]
    model = load_onnx(_save(tmp_path / "norms.onnx", nodes, [_const("gamma", np.linspace(0.5, 2, 16)),
                                                             _const("beta", np.linspace(-1, 1, 16))], y=(8, 16)))
    tasks = extract_workloads(model)
    ops = {}
    for w in tasks:
        for op in approximable(w.ir_module()):
            ops.setdefault(op, []).append(w)
    assert {"exp", "tanh"} <= set(ops)  # softmax's exp, the tanh (layer norm's rsqrt is vector already)
    for w in tasks:
        assert w.fast_math, (w.name, w.prim.exact_math)
        fast = rewrite(w.ir_module())[0]
        assert not re.search(r"call\w*\s+\w*(expf|tanhf|erff)", _asm(fast))


# ---------------------------------------------------------------- the stated errors (docs/models.md)

# op: (float64 reference, input range, "abs" or "rel", the bound docs/models.md states). Built for a
# generic x86-64 (no FMA): the worst case; exp's range reduction loses most without FMA.
STATED = {
    "erf": (special.erf, (-10.0, 10.0), "abs", 5e-7),
    "tanh": (np.tanh, (-20.0, 20.0), "abs", 5e-7),
    "exp": (np.exp, (-87.3, 88.3), "rel", 5e-6),
    "sigmoid": (special.expit, (-87.0, 87.0), "rel", 5e-6),
}


@pytest.mark.parametrize("op", sorted(STATED))
def test_the_approximations_errors_are_within_the_stated_bounds(op):
    import tvm
    from tvm import te
    from tvm.s_tir import Schedule

    from spatialtune.workloads.fastmath import rewrite

    ref, (lo, hi), kind, bound = STATED[op]
    n = 1 << 20
    x = np.concatenate([np.linspace(lo, hi, n), np.linspace(-1, 1, n // 8), [0.0, 1e-30, -1e-30]]).astype(np.float32)
    a = te.placeholder((x.size,), name="a")
    b = te.compute((x.size,), lambda i: getattr(te, op)(a[i]), name="b")
    sch = Schedule(te.create_prim_func([a, b]))
    sch.vectorize(sch.split(sch.get_loops(sch.get_sblock("b"))[0], [None, 16])[1])
    fast, counts = rewrite(sch.mod)
    assert counts == {op: 1}
    lib = tvm.compile(fast, target=tvm.target.Target({"kind": "llvm"}))
    out = tvm.runtime.tensor(np.zeros_like(x))
    lib["main"](tvm.runtime.tensor(x), out)
    want = ref(x.astype(np.float64))
    err = np.abs(out.numpy().astype(np.float64) - want)
    if kind == "rel":
        err = err / np.abs(want)
    worst = float(err.max())
    assert 0 < worst <= bound, f"{op}: max {kind} error {worst:.3g} at x = {x[err.argmax()]:.6g}"


def test_the_model_compiles_with_the_tuned_gelu_record_and_fast_math(gelu):
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from spatialtune.models.e2e import compile_model
    from spatialtune.models.importer import load_onnx
    from spatialtune.workloads.schedule import apply_trace, trace_to_json

    path, w = gelu
    model = load_onnx(path)
    mod = w.ir_module()
    tgt = {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}
    # a tuning record of the task: the vectorised schedule's trace, replayed as records_for does
    replayed = apply_trace(w, trace_to_json(_schedule(w).trace))
    msdb = ms.database.MemoryDatabase()
    msdb.commit_tuning_record(ms.database.TuningRecord(
        replayed.trace, msdb.commit_workload(mod), run_secs=[1e-5], target=tvm.target.Target(tgt),
        args_info=ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
    x = np.random.default_rng(1).uniform(-1, 1, (8, 16)).astype(np.float32)
    init = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in onnx.load(path).graph.initializer}
    h = x.astype(np.float64) @ init["w"] + init["b"]
    want = h * 0.5 * (1 + special.erf(h / math.sqrt(2)))
    asms = {}
    for label, tasks in (("fast", [w]), ("exact", [])):
        ex, applied = compile_model(model, tgt, msdb, tasks=tasks)
        assert applied == 1  # the record still matches the model's function structurally
        asms[label] = "\n".join(m.inspect_source("asm") for m in ex.mod.imports if m.kind == "llvm")
        vm = relax.VirtualMachine(ex, tvm.cpu())
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert re.search(r"call\w*\s+erff\b", asms["exact"])
    assert "erff" not in asms["fast"] and len(re.findall(PACKED, asms["fast"])) >= 10


def test_the_cli_writes_the_decision_into_the_space_and_exact_math_turns_it_off(gelu, tmp_path):
    from conftest import run_cli

    path, _ = gelu
    run_cli("workloads", "--from-onnx", path, "--out", tmp_path / "fast.toml", check=True)
    run_cli("workloads", "--from-onnx", path, "--exact-math", "--out", tmp_path / "exact.toml", check=True)
    assert "exact_math" not in (tmp_path / "fast.toml").read_text()
    assert 'exact_math = "fast math turned off"' in (tmp_path / "exact.toml").read_text()
    bad = run_cli("workloads", "--space", "demo", "--exact-math")
    assert bad.returncode == 2 and "--exact-math go with --from-onnx" in bad.stderr
