import numpy as np
import pytest

from spatialtune.errors import SpecError
from spatialtune.workloads.ops import OPERATORS, get_operator
from spatialtune.workloads.spec import load_space, make_key

from conftest import SPACES, run_cli


@pytest.mark.parametrize("path", sorted(SPACES.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_space_parses(path):
    space = load_space(path)
    assert space.workloads
    keys = [w.key for w in space.workloads]
    assert len(keys) == len(set(keys)), "two workloads of one file compute the same thing"


def test_real_model_shapes_are_there():
    ops = {w.op for p in SPACES.glob("*.toml") for w in load_space(p).workloads}
    assert {"dense", "batch_matmul", "conv2d", "depthwise_conv2d", "matmul"} <= ops
    bert = {w.name: w for w in load_space(SPACES / "bert_base.toml").workloads}
    assert bert["bert_qk_fp32"].params == {"B": 12, "M": 128, "N": 128, "K": 64, "transpose_b": 1}
    assert bert["bert_ffn1_fp16"].dtype == "fp16"
    r50 = {w.name: w for w in load_space(SPACES / "resnet50.toml").workloads}
    assert r50["r50_s1_3x3_fp32"].flops == 2 * 64 * 56 * 56 * 64 * 9


def test_key_is_stable_and_readable(tmp_path):
    text = '[[workload]]\nname = "a"\nop = "dense"\nshape = { M = 2, N = 3, K = 4 }\n'
    (tmp_path / "one.toml").write_text(text)
    (tmp_path / "two.toml").write_text(text.replace('name = "a"', 'name = "other"'))
    k1 = load_space(tmp_path / "one.toml").workloads[0].key
    k2 = load_space(tmp_path / "two.toml").workloads[0].key
    assert k1 == k2 == "dense_fp32_M2_N3_K4" == make_key("dense", "fp32", {"M": 2, "N": 3, "K": 4})


@pytest.mark.parametrize(
    "body, field",
    [
        ('[[workload]]\nname = "a"\nop = "conv3d"\nshape = { M = 1 }\n', "workload[0].op"),
        ('[[workload]]\nname = "a"\nop = "dense"\nshape = { M = 1, N = 2 }\n', "workload[0].shape"),
        ('[[workload]]\nname = "a"\nop = "dense"\nshape = { M = 1, N = 2, K = 3, Q = 4 }\n', "workload[0].shape"),
        ('[[workload]]\nname = "a"\nop = "dense"\nshape = { M = -1, N = 2, K = 3 }\n', "workload[0].shape"),
        ('[[workload]]\nname = "a"\nop = "dense"\ndtype = "int4"\nshape = { M = 1, N = 2, K = 3 }\n',
         "workload[0].dtype"),
        ('[[workload]]\nop = "dense"\nshape = { M = 1, N = 2, K = 3 }\n', "workload[0].name"),
        ('[[workload]]\nname = "a"\nop = "dense"\nshape = { M = 1, N = 2, K = 3 }\nfoo = 1\n', "workload[0].foo"),
        ('[[workload]]\nname = "a"\nop = "conv2d"\nshape = { N = 1, C = 1, H = 2, W = 2, K = 1, R = 5, S = 5 }\n',
         "workload[0].shape"),
        ('[space]\nname = "x"\n', "no [[workload]]"),
        ("this is = = not toml", "not valid TOML"),
    ],
)
def test_malformed_files_name_file_and_field(tmp_path, body, field):
    f = tmp_path / "bad.toml"
    f.write_text(body)
    with pytest.raises(SpecError) as e:
        load_space(f)
    msg = str(e.value)
    assert str(f) in msg and field in msg and "\n" not in msg


def test_cli_workloads_lists_keys_first():
    p = run_cli("workloads", "--space", SPACES / "demo.toml", check=True)
    lines = p.stdout.strip().splitlines()
    keys = [w.key for w in load_space(SPACES / "demo.toml").workloads]
    assert [ln.split("\t")[0] for ln in lines] == keys


def test_cli_bad_space_is_one_line_exit_2(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[[workload]]\nname = "a"\nop = "nope"\nshape = { M = 1 }\n')
    p = run_cli("workloads", "--space", f)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "workload[0].op" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_numpy_reference_matches_naive_loops(name):
    """The references every kernel is checked against are themselves checked, on tiny shapes."""
    op = get_operator(name)
    p = {"matmul": dict(M=3, N=4, K=5), "dense": dict(M=3, N=4, K=5),
         "batch_matmul": dict(B=2, M=3, N=4, K=5, transpose_b=1),
         "conv2d": dict(N=1, C=2, H=5, W=5, K=3, R=3, S=3, stride=2, pad=1),
         "depthwise_conv2d": dict(N=1, C=2, H=5, W=5, R=3, S=3, stride=1, pad=1)}[name]
    p = op.check_params(p)
    xs = op.random_inputs(p, "fp32", np.random.default_rng(0))
    got = op.reference(p, xs)
    a, b = (x.astype(np.float64) for x in xs)
    want = np.zeros(op.output_shape(p))
    for idx in np.ndindex(*want.shape):
        if name == "matmul":
            want[idx] = sum(a[idx[0], k] * b[k, idx[1]] for k in range(p["K"]))
        elif name == "dense":
            want[idx] = sum(a[idx[0], k] * b[idx[1], k] for k in range(p["K"]))
        elif name == "batch_matmul":
            want[idx] = sum(a[idx[0], idx[1], k] * b[idx[0], idx[2], k] for k in range(p["K"]))
        else:
            n, c_or_k, y, x = idx
            acc = 0.0
            chans = [c_or_k] if name == "depthwise_conv2d" else range(p["C"])
            for c in chans:
                for r in range(p["R"]):
                    for s in range(p["S"]):
                        yy, xx = y * p["stride"] + r - p["pad"], x * p["stride"] + s - p["pad"]
                        if 0 <= yy < p["H"] and 0 <= xx < p["W"]:
                            wgt = b[c, 0, r, s] if name == "depthwise_conv2d" else b[c_or_k, c, r, s]
                            acc += a[n, c, yy, xx] * wgt
            want[idx] = acc
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
