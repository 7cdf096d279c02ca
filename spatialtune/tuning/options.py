"""What a tuning job is asked to do (what it reports back is :mod:`.results`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from ..measure.runner import RunSettings
from ..partitions import Partition
from ..search.cost_model import create_cost_model
from ..search.evolution import EvolutionConfig, SearchRun
from ..search.policy import PolicyOptions
from ..terms import check_interference


@dataclass
class TuneOptions:
    trials: int = 32  # per (workload, share) [scheduler each] or per share across the tasks [gradient],
    # counting transfers and earlier runs
    scheduler: str = "each"  # each | gradient (a model's tasks: trials go where weight x time is)
    batch: int = 16  # candidates built and measured per round
    time_budget_s: float | None = None  # whole job; checked between batches
    target: str = "cpu"  # cpu | cuda
    partition: str | Partition | None = None  # default: cpu for the CPU target, mps for cuda
    interference: str = "none"
    cost_model: str = "xgb"
    transfer_top: int = 2  # configs taken from each other share
    matrix_top: int = PolicyOptions.matrix_top  # each condition's fastest kernels measured under every other
    seeds_per_share: int = 16  # parents taken from each other condition
    population: int = EvolutionConfig.population
    genetic_iters: int = EvolutionConfig.genetic_iters
    explore: float = EvolutionConfig.explore  # fraction of each batch sampled uniformly
    local: float = EvolutionConfig.local  # fraction of each batch: random single mutations of the best kernels
    diversity: float = EvolutionConfig.diversity  # novelty weight when a batch is picked (0: top-n)
    pack_panels: bool = EvolutionConfig.pack_panels  # CPU: also the space with packed operand panels
    tile_seeds: int = EvolutionConfig.tile_seeds  # CPU: register-tiled samples in a share's first batches
    # Threads of the evolution's sampling and mutation (default: the cores this process may use).
    # With 1 a search is reproducible: the same seed and the same measurements give the same
    # candidates (with more, which thread draws what depends on timing).
    search_threads: int | None = None
    mcpu: str | None = None  # CPU: LLVM CPU to compile for (default: this machine's)
    arch: str | None = None  # CUDA: sm_XY to compile for (default: the device's)
    seed: int = 0
    # Workload (name or key) -> that many uniform samples of its design space, none measured
    # before, measured at the job's first share before its search: a pool no cost model chose.
    samples: dict[str, int] = field(default_factory=dict)
    baselines: bool = True
    confirm_top: int = 4  # the fastest kernels of a key measured again after its search (0: none)
    artifact_dir: str | None = None
    build_workers: int | None = None
    # A build over this many times its workload's median build, and over 10 s, is cut (None: never; see
    # measure.builder.LocalBuilder). It depends on timing: a reproducible search needs it off.
    build_deadline: float | None = 10.0
    run: RunSettings = field(default_factory=RunSettings)

    def validate(self) -> None:
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise ConfigError(f"--trials must be a positive integer, got {self.trials!r}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise ConfigError(f"--batch must be a positive integer, got {self.batch!r}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ConfigError(f"--time-budget must be positive, got {self.time_budget_s!r}")
        if self.scheduler not in ("each", "gradient"):
            raise ConfigError(f"--scheduler must be each or gradient, got {self.scheduler!r}")
        if self.target not in ("cpu", "cuda"):
            raise ConfigError(f"--target must be cpu or cuda, got {self.target!r}")
        if not (isinstance(self.population, int) and self.population >= 8):
            raise ConfigError(f"--population must be an integer of at least 8, got {self.population!r}")
        if not (isinstance(self.genetic_iters, int) and self.genetic_iters >= 0):
            raise ConfigError(f"--genetic-iters must be a non-negative integer, got {self.genetic_iters!r}")
        if not (0.0 <= self.explore <= 1.0):
            raise ConfigError(f"--explore must be a fraction in [0, 1], got {self.explore!r}")
        if not (isinstance(self.local, (int, float)) and 0.0 <= self.local <= 1.0 - self.explore):
            raise ConfigError(f"--local must be a fraction in [0, 1 - explore], got {self.local!r}")
        if not (isinstance(self.diversity, (int, float)) and 0.0 <= self.diversity):
            raise ConfigError(f"--diversity must be a non-negative number, got {self.diversity!r}")
        if self.search_threads is not None and not (isinstance(self.search_threads, int) and self.search_threads >= 1):
            raise ConfigError(f"--search-threads must be a positive integer, got {self.search_threads!r}")
        if self.build_deadline is not None and not (isinstance(self.build_deadline, (int, float))
                                                    and self.build_deadline > 1):
            raise ConfigError(f"--build-deadline must exceed 1 (times the median build) or be 0 for none, "
                              f"got {self.build_deadline!r}")
        if isinstance(self.tile_seeds, bool) or not (isinstance(self.tile_seeds, int) and self.tile_seeds >= 0):
            raise ConfigError(f"--tile-seeds must be a non-negative integer, got {self.tile_seeds!r}")
        if self.transfer_top < 0 or self.seeds_per_share < 0:
            raise ConfigError("--transfer-top and --seeds-per-share must not be negative")
        if isinstance(self.matrix_top, bool) or not (isinstance(self.matrix_top, int) and self.matrix_top >= 0):
            raise ConfigError(f"--matrix-top must be a non-negative integer, got {self.matrix_top!r}")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in self.samples.values()):
            raise ConfigError(f"uniform samples per workload must be non-negative integers, got {self.samples!r}")
        check_interference(self.interference)
        create_cost_model(self.cost_model)

    def policy(self) -> PolicyOptions:
        return PolicyOptions(cost_model=self.cost_model, transfer_top=self.transfer_top,
                             matrix_top=self.matrix_top, seeds_per_share=self.seeds_per_share,
                             evolution=EvolutionConfig(population=self.population, genetic_iters=self.genetic_iters,
                                                       explore=self.explore, local=self.local,
                                                       diversity=self.diversity, pack_panels=self.pack_panels,
                                                       tile_seeds=self.tile_seeds))

    def search_run(self) -> SearchRun:
        return SearchRun(batch=self.batch, seed=self.seed, threads=self.search_threads)
