"""The search: scores the evolution can use, and a search that beats uniform sampling."""
import math
from pathlib import Path

import numpy as np
import pytest

from spatialtune.search.cost_model import RandomModel, XGBModel, relative_throughput, spearman, with_share
from spatialtune.search.policy import TrainingSet, fit_share_model


def _data(n=60, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 493)).astype(np.float32)
    t = 1e-3 * (1 + 4 * x[:, 0] + 0.5 * x[:, 1])  # time grows with two of the features
    return with_share(x, 2, 2), t


def test_an_untrained_model_explores():
    """Before any fit, scores are random (MetaSchedule's evolution picks parents in proportion to
    them: constant scores would make every parent the first candidate) and positive."""
    x, _ = _data()
    for model in (XGBModel(seed=1), RandomModel(seed=1)):
        s = model.score(x)
        assert len(set(np.round(s, 12))) > len(s) // 2 and (s > 0).all()


def test_trained_scores_are_positive_calibrated_and_follow_speed():
    """Scores are a predicted relative throughput in (0, 1]: positive, comparable between calls,
    higher for faster candidates."""
    x, t = _data()
    m = XGBModel(seed=0)
    m.fit(x[:40], t[:40], ["w"] * 40)
    s = m.score(x[40:])
    assert (s > 0).all() and (s <= 1).all()
    rho = np.corrcoef(np.argsort(np.argsort(s)), np.argsort(np.argsort(-t[40:])))[0, 1]
    assert rho > 0.5
    again = XGBModel.from_json(m.to_json())
    assert np.allclose(again.score(x[40:]), s)


def test_relative_throughput_is_per_group():
    r = relative_throughput([1.0, 2.0, 4.0, 3.0], ["a", "a", "b", "b"])
    assert list(r) == [1.0, 0.5, 0.75, 1.0]


class _Spy(RandomModel):
    def fit(self, features, times, groups, group_weight=None):
        self.weights = dict(group_weight)


def _two_shares(rng, n_whole, n_half, workload="w"):
    """A workload whose ranking at 50 % (1 of 2 units) is the reverse of its ranking at 100 % in
    the first feature: the tiling that suits two cores does not suit one."""
    data = TrainingSet(2)
    for ratio, units, n, sign in ((100, 2, n_whole, 1.0), (50, 1, n_half, -1.0)):
        for _ in range(n):
            x = rng.normal(size=8)
            data.add(x, float(np.exp(sign * x[0] + 0.3 * x[1])), workload, ratio, units)
    return data


def test_other_shares_lead_a_new_share_and_fade_as_it_measures_the_workload():
    rng = np.random.default_rng(0)
    data = _two_shares(rng, 40, 0)
    data.add(rng.normal(size=8), 1.0, "other", 50, 1)
    spy = _Spy()
    fit_share_model(spy, data, 50, own_share_weight=3.0, transfer_fade_rows=32)
    assert spy.weights == {"w@100": 1.0, "other@50": 3.0}  # "w" has no rows at 50 % yet
    for _ in range(32):
        data.add(rng.normal(size=8), 1.0, "w", 50, 1)
    fit_share_model(spy, data, 50, own_share_weight=3.0, transfer_fade_rows=32)
    assert spy.weights == {"w@100": 0.5, "w@50": 3.0, "other@50": 3.0}


def test_a_share_that_measured_the_workload_follows_its_own_ranking_where_the_whole_device_disagrees():
    """256 rows at 100 %, 48 at 50 % ranked the other way: the 50 % model ranks held-out 50 %
    candidates by their 50 % speed, and better than with the whole device's rows at full weight.
    Fixed data and seeds: the figures are deterministic (fade 0.95, without 0.85 over 6 draws)."""
    rho = {}
    for fade in (32.0, math.inf):
        r = []
        for seed in range(6):
            rng = np.random.default_rng(seed)
            data = _two_shares(rng, 256, 48)
            xt = rng.normal(size=(300, 8))
            m = XGBModel(seed=0)
            fit_share_model(m, data, 50, own_share_weight=3.0, transfer_fade_rows=fade)
            r.append(spearman(m.predict(with_share(xt, 1, 2)), -np.exp(-xt[:, 0] + 0.3 * xt[:, 1])))
        rho[fade] = float(np.mean(r))
    assert rho[32.0] > 0.85 and rho[32.0] > rho[math.inf] + 0.05, rho


RECORDED = Path(__file__).parent / "data" / "search-vs-uniform.json"


def test_search_beats_uniform_sampling_on_one_core(tmp_path):
    """At an equal budget, over three seeds, spatialtune's best kernel is faster than the best of
    as many uniform samples of the same design space, on one core.

    The times are replayed (tests/recorded.py): each kernel's time was measured once, for real, on
    one core with the runner's default settings, and the search runs with one thread, so it
    proposes exactly the kernels it proposed when the table was recorded. Live timings made this
    comparison flip with the load: the search's best for one seed varied 77-203 us between runs on
    the dense (a search that settles in a basin of 140 us tilings for its last batches), while
    uniform's best stayed within 106-140 us. A kernel the table lacks is measured live and
    counted; ``SPATIALTUNE_RECORD=1`` stores it (the table names the machine that recorded it)."""
    from spatialtune.device import detect_cpu, target_for
    from spatialtune.measure.builder import BuildInput
    from spatialtune.measure.runner import RunInput, RunSettings
    from spatialtune.partitions.cpu import CpuPartition
    from spatialtune.search.uniform import UniformSampler
    from spatialtune.store.database import TuningDatabase
    from spatialtune.tuning import TuneOptions, tune
    from spatialtune.workloads.spec import load_space
    from recorded import MCPU, TUNE_OPTIONS, replaying

    w = load_space("demo").select(["dense_small"])[0]
    part = CpuPartition()
    share = part.grant(100 / len(part.cores))  # one core
    budget, seeds = 48, (0, 1, 2)
    device = detect_cpu(MCPU)
    target = target_for(device, share.units)
    best: dict[tuple, float] = {}
    with replaying(RECORDED, part, RunSettings(), tmp_path / "art") as (runner, builder):
        for seed in seeds:
            with TuningDatabase(tmp_path / f"st{seed}.sqlite") as db:
                tune([w], [share.key_ratio], db, TuneOptions(trials=budget, seed=seed, baselines=False, **TUNE_OPTIONS),
                     runner=runner, builder=builder)
                best["spatialtune", seed] = min(m.median_s for m in db.measurements(status="ok"))
            cands = UniformSampler(w, target, seed=seed).sample(budget)
            built = builder.build([BuildInput.of(c, w.key) for c in cands], target)
            res = runner.run(share, "none", [RunInput(w.to_dict(), x.artifact, None, c.mod_hash)
                                             for c, x in zip(cands, built) if x.ok])
            best["uniform", seed] = min(r.median_s for r in res if r.status == "ok")
    runner.save_if_asked(workload=w.key, target=target, machine=f"{device.name} ({detect_cpu().arch}), one core",
                         settings="runner defaults")
    st = [math.log(best["spatialtune", s]) for s in seeds]
    un = [math.log(best["uniform", s]) for s in seeds]
    print(f"one core, {budget} trials ({runner.replayed} times replayed, {runner.measured} measured now): "
          f"spatialtune {np.round(np.exp(st) * 1e6, 1)} us, uniform {np.round(np.exp(un) * 1e6, 1)} us")
    assert np.mean(st) < np.mean(un)


def test_a_search_with_one_thread_proposes_the_same_kernels_when_told_the_same_times(tmp_path):
    """What the replayed comparison above rests on: with ``search_threads=1`` the second run,
    told the first run's times, proposes exactly the same kernels in the same order."""
    from spatialtune.measure.runner import LocalRunner, RunSettings
    from spatialtune.partitions.cpu import CpuPartition
    from spatialtune.store.database import TuningDatabase
    from spatialtune.tuning import TuneOptions, tune
    from spatialtune.workloads.spec import load_space
    from recorded import RecordedRunner

    w = load_space("demo").select(["dense_small"])[0]
    part = CpuPartition()
    share = part.grant(100 / len(part.cores))
    runs = []
    with LocalRunner(part, settings=RunSettings(repeat=2, min_repeat_ms=5, warmup_ms=5)) as live:
        runner = RecordedRunner(tmp_path / "none.json", live)  # an empty table, filled by the first run
        for i in range(2):
            with TuningDatabase(tmp_path / f"{i}.sqlite") as db:
                tune([w], [share.key_ratio], db, TuneOptions(trials=16, batch=8, population=64, baselines=False,
                                                             build_deadline=None,
                                                             search_threads=1, artifact_dir=str(tmp_path / "art")),
                     runner=runner)
                runs.append([m.mod_hash for m in sorted(db.measurements(), key=lambda m: m.id)])
    assert len(runs[0]) == 16 and runs[0] == runs[1]
    assert runner.measured == runner.replayed == 16


def test_exploration_survives_small_batches_and_repeats_never_end_the_search():
    """Batches of 2 with 0.25 exploration and 0.25 neighbours: a quarter of the candidates are
    uniform samples (MetaSchedule's own epsilon-greedy would round 0.25 * 2 down to none) and a
    quarter single mutations of the fastest kernels measured (one knob changed, or only a
    parallel annotation or a compute location); no candidate comes twice, and a search seeded with measured kernels
    keeps proposing new ones."""
    from spatialtune.device import detect_cpu, target_for
    from spatialtune.search.cost_model import create_cost_model
    from spatialtune.search.evolution import EvolutionarySearch, EvolutionConfig, SearchRun
    from spatialtune.search.uniform import UniformSampler
    from spatialtune.workloads.spec import load_space

    w = load_space("demo").select(["dense_small"])[0]
    target = target_for(detect_cpu(), 1)
    measured = [(c.trace, 1e-3 * (i + 1)) for i, c in enumerate(UniformSampler(w, target, seed=5).sample(12))]
    search = EvolutionarySearch(w, target, create_cost_model("random", seed=0), measured=measured,
                                run=SearchRun(batch=2),
                                config=EvolutionConfig(population=32, genetic_iters=1, explore=0.25, local=0.25))

    def knobs(trace):  # compute locations left out: after a tile move the replay may have to re-pick one
        t = search.space.replay(trace).trace
        return [str(t.decisions[i]) for i in t.insts if i in t.decisions and i.kind.name != "SampleComputeLocation"]

    fastest = [knobs(tr) for tr, _ in measured[:search.LOCAL_PARENTS]]  # told 1 ms and slower below
    seen, explore, local = set(search.measured), 0, 0
    try:
        for i in range(12):
            got = search.ask(2)
            assert len(got) == 2, f"ask {i} came back with {len(got)}"
            for c in got:
                assert c.mod_hash not in seen
                seen.add(c.mod_hash)
                explore += c.source == "explore"
                if c.source == "local":
                    local += 1
                    k = knobs(c.trace)
                    assert min(sum(a != b for a, b in zip(k, f)) for f in fastest) <= 1, (k, fastest)
            search.tell(got, [1.0] * len(got))  # slower than every kernel measured before
    finally:
        search.close()
    assert explore == 6 and local == 6  # 0.25 of 24 each, carried over from batch to batch


def test_a_batch_is_picked_for_new_knob_values_not_only_the_best_predictions():
    """Four candidates best-predicted first: the first three share every tile size but one, the
    fourth shares none. With the novelty weight the batch of two is the best one and the fourth;
    without it, the two best-predicted. The knobs are read from real traces."""
    from spatialtune.device import detect_cpu, target_for
    from spatialtune.search.cost_model import create_cost_model
    from spatialtune.search.evolution import EvolutionarySearch, EvolutionConfig, SearchRun, decisions, diverse_pick
    from spatialtune.workloads.spec import load_space

    a = {("SamplePerfectTile", 0): "(1, 2)", ("SamplePerfectTile", 1): "(8, 8)", ("SampleCategorical", 0): "1"}
    knobs = [a, a | {("SampleCategorical", 0): "2"}, a | {("SampleCategorical", 0): "3"},
             {("SamplePerfectTile", 0): "(2, 1)", ("SamplePerfectTile", 1): "(4, 16)", ("SampleCategorical", 0): "0"}]
    assert diverse_pick(knobs, 2, 1.0) == [0, 3]
    assert diverse_pick(knobs, 2, 0.0) == [0, 1]
    assert sorted(diverse_pick(knobs, 9, 1.0)) == [0, 1, 2, 3]

    w = load_space("demo").select(["dense_small"])[0]
    search = EvolutionarySearch(w, target_for(detect_cpu(), 1), create_cost_model("random", seed=0),
                                run=SearchRun(batch=4),
                                config=EvolutionConfig(population=32, genetic_iters=1, explore=0.0,
                                                       tile_seeds=0))  # the evolution's batch alone
    try:
        got = search.ask(4)
    finally:
        search.close()
    ks = [decisions(c) for c in got]
    assert len(got) == 4 and all(any(k[0] == "SamplePerfectTile" for k in d) for d in ks), ks
    assert len({tuple(sorted(d.items())) for d in ks}) == 4


@pytest.mark.parametrize("kind", ["evolution", "uniform"])
def test_both_searches_keep_one_ask_tell_contract(kind):
    """The evolutionary search and uniform sampling are both a ``Search``: one driver runs either.
    From a kernel measured already, each ask brings only kernels never measured nor proposed, and
    each one told joins ``measured``."""
    from spatialtune.device import detect_cpu, target_for
    from spatialtune.search.cost_model import create_cost_model
    from spatialtune.search.evolution import EvolutionarySearch, EvolutionConfig, SearchRun
    from spatialtune.search.space import Search
    from spatialtune.search.uniform import UniformSampler
    from spatialtune.workloads.spec import load_space

    w = load_space("demo").select(["dense_small"])[0]
    target = target_for(detect_cpu(), 1)
    (start,) = UniformSampler(w, target, seed=11).ask(1)
    if kind == "evolution":
        search = EvolutionarySearch(w, target, create_cost_model("random", seed=0), measured=[(start.trace, 1e-3)],
                                    run=SearchRun(batch=4, threads=1),
                                    config=EvolutionConfig(population=16, genetic_iters=1, tile_seeds=0))
    else:
        search = UniformSampler(w, target, seed=11, exclude={start.mod_hash})
    assert isinstance(search, Search) and search.measured == {start.mod_hash}
    seen = {start.mod_hash}
    try:
        for step in range(3):
            got = search.ask(4)
            hashes = {c.mod_hash for c in got}
            assert len(got) == len(hashes) == 4 and not hashes & seen, (step, len(got))
            search.tell(got, [1e-3 * (i + 2) for i in range(4)])
            seen |= hashes
            assert seen == search.measured
    finally:
        search.close()


def test_a_failure_inside_metaschedules_sampling_costs_the_chunk_not_the_job(caplog, monkeypatch):
    """A check failing inside TVM while it samples (a softmax's space raised parallel_for_dynamic
    errors in a full bench-model run) loses that chunk; after three in a row the key has no more
    samples, and the job goes on with the other keys."""
    from spatialtune.device import detect_cpu, target_for
    from spatialtune.search.uniform import UniformSampler
    from spatialtune.workloads.spec import load_space

    w = load_space("demo").select(["dense_small"])[0]
    sampler = UniformSampler(w, target_for(detect_cpu(), 1), seed=3)
    real = sampler.strategy
    calls = []

    class Failing:  # the strategy's interface as _refill uses it, failing where TVM's did
        def pre_tuning(self, **kw):
            real.pre_tuning(**kw)

        def generate_measure_candidates(self):
            calls.append(1)
            if len(calls) == 1:
                return real.generate_measure_candidates()
            raise RuntimeError("parallel_for_dynamic error with Check failed: (args.size() == ...) is false:")

        def post_tuning(self):
            real.post_tuning()

    failing = Failing()
    monkeypatch.setattr(UniformSampler, "strategy", property(lambda self: failing))
    first = sampler.sample(4)
    assert len(first) == 4 and len(calls) == 1  # the first chunk came through
    sampler._buffer.clear()
    assert sampler.sample(4) == [] and len(calls) == 4  # three failed chunks: nothing more, no exception
    assert "MetaSchedule's sampling failed (parallel_for_dynamic" in caplog.text
