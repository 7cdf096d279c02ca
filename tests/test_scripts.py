"""Every script in scripts/ runs, in its quick mode (SPATIALTUNE_QUICK=1), so none can break
unnoticed. The scripts write into a temporary database and directory, never the repository's."""
import os
import subprocess

import pytest

from conftest import ROOT

SCRIPTS = sorted(p.name for p in (ROOT / "scripts").iterdir()
                 if p.is_file() and os.access(p, os.X_OK) and not p.name.startswith("_") and p.suffix != ".py")
# what each quick run must print, so a script that "succeeds" without doing its job fails here
EXPECT = {
    "demo": "report of this database",
    "test": "tests collected",
    "bench": "time per trial",
    "bench-lookup": "spatialtune Lookup, warm",
    "bench-search": "onnxruntime ",  # its anchor row: ORT ran and was right
    "bench-distributed": "scaling efficiency with 2 servers",

    "bench-model": "end-to-end latency vs ONNX Runtime",
    "bench-model-swap": "swap, preloaded",
    "gpu-bundle": "candidates sm_90",
    "gpu-check": "cpu:50%",
    "figures": "figures checked",
}


def test_every_script_has_an_expectation():
    assert set(SCRIPTS) <= set(EXPECT), f"scripts without a quick-mode check: {set(SCRIPTS) - set(EXPECT)}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_quick_mode(name, tmp_path):
    if name == "gpu-bundle":
        from spatialtune.cuda.cubin import find_nvcc

        if not find_nvcc():
            pytest.skip("no nvcc here to compile the bundle's cubins")
    env = dict(os.environ, SPATIALTUNE_QUICK="1", SPATIALTUNE_DB=str(tmp_path / "db.sqlite"),
               REPORT=str(tmp_path / "report"), OUT=str(tmp_path / "out"))
    p = subprocess.run([str(ROOT / "scripts" / name)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=1200)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{name} exited {p.returncode}:\n{out[-4000:]}"
    assert EXPECT[name] in out, f"{name} did not print {EXPECT[name]!r}:\n{out[-4000:]}"
    if name == "demo":  # it wrote where it was told, not into the repository's database
        assert (tmp_path / "db.sqlite").exists() and (tmp_path / "report" / "report.html").exists()
    if name == "gpu-bundle":  # the carry holds the two models, their libraries as cubins only
        assert "2 models in 2 libraries" in out and "CUDA modules as cubin" in out
    if name == "gpu-check":  # the whole path on this host's cores: the estimate, kernels, then the models
        import json

        assert "device-time estimate: load" in out
        res = json.loads((tmp_path / "out" / "results.json").read_text())
        runs = {(r["model"], r["condition"], r["variant"]): r for r in res["model_runs"]}
        assert set(runs) == {(m, c, v) for m in ("bert_layer", "resnet_stage") for c in ("cpu:100%", "cpu:50%")
                             for v in ("whole-tuned", "share-tuned", "onnxruntime")}
        assert all(r["status"] == "ok" and r["rel_err"] < 1e-3 for r in runs.values()), runs
        assert "ONNX Runtime on this device: onnxruntime" in out


def test_bench_search_takes_each_ratio_to_the_vendor_within_one_round():
    """A slow phase of the host slows the anchors and the kernels of that round alike: the ratio
    is the median of the rounds' ratios, so it does not move with the phase."""
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_search_stats import vs_vendor

    d = {"numpy_s": 2.0, "numpy_rounds": [2.0, 3.0, 2.0, 3.0]}
    assert vs_vendor(d, {"t": 2.5, "rounds": [2.5, 3.75, 2.5, 3.75]}) == pytest.approx(0.8)
    assert vs_vendor(d, {"t": 2.5, "rounds": [2.5, None, 2.5, 3.75]}) == pytest.approx(0.8)  # a failed round
    assert vs_vendor({"numpy_s": 2.0}, {"t": 2.5}) == pytest.approx(0.8)  # a pass recorded before the rounds


def test_bench_model_runs_a_model_of_your_own_the_same_way(tmp_path):
    from test_layout import plain_block

    path = plain_block(tmp_path / "mine.onnx")
    env = dict(os.environ, SPATIALTUNE_QUICK="1", SPATIALTUNE_DB=str(tmp_path / "db.sqlite"), OUT=str(tmp_path / "out"))
    p = subprocess.run([str(ROOT / "scripts" / "bench-model"), "--models", "", "--onnx", str(path), "--layouts", "nchw"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "mine: 2 tasks" in out and "end-to-end latency vs ONNX Runtime" in out, out[-4000:]
    assert (tmp_path / "out" / "mine-result.json").exists()
    bad = subprocess.run([str(ROOT / "scripts" / "bench-model"), "--models", "", "--onnx", str(tmp_path / "no.onnx")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [f"bench-model: --onnx {tmp_path / 'no.onnx'}: "
                                                                       "no such file"], bad.stderr
