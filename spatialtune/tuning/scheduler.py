"""Which task of a model gets the next batch of trials at a share.

A model's latency is the sum over its tasks of weight x kernel time, so a trial is worth most
where that product is largest. MetaSchedule's gradient task scheduler spends its global budget
the same way (it estimates each task's gain from its weight and its latency history). Here:

- every task gets a first round before any task gets more (a task nobody measured has no time
  to weigh): a batch, smaller when the budget is small for the number of tasks
  (:func:`first_round`), its transfers counted;
- then each task's *due* share of the trials spent is ``weight x best time / sum over tasks``
  (with floors, below: the time it is behind its floor), recomputed after every batch from the
  times measured so far; the next batch goes to the task furthest below its due share (trials
  spent on it minus its due share of everything spent, with this batch counted), ties to the
  heavier task.

So the trials follow where the time goes, and move as tuning brings a task's time down: a task
at 60 % of the model's time gets about 60 % of the trials; one that tuning halved gets less from
then on. Trials already in the database count (a resumed job starts from what it has), and a task
whose design space is exhausted leaves the schedule.

A task may have a *floor*: the time the library the user would otherwise run (ONNX Runtime, from
``spatialtune model --profile``) takes for the same operators at this share, per call. A task
whose best kernel has reached its floor takes no trials while some task has not reached its own:
the model is only as fast as ONNX Runtime when every task is, and the trials a task at its floor
would take are the ones the tasks behind theirs need, and among those the trials follow the time
each is behind (:func:`due_fractions`). Floors come from ONNX Runtime profiled alone under the
share before tuning (:mod:`spatialtune.models.floors`, ``spatialtune model --floors``) or from a
profiled end-to-end run.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TaskState:
    name: str
    weight: int  # how often the model runs it
    spent: int  # trials measured under this share's key, earlier runs included
    best_s: float | None  # best measured time at this share
    done: bool = False  # exhausted, or nothing more can be measured
    floor_s: float | None = None  # the vendor library's time for the same operators, per call

    @property
    def at_floor(self) -> bool:
        return self.best_s is not None and self.floor_s is not None and self.best_s <= self.floor_s

    @property
    def gap(self) -> float | None:
        """How much of the model's time it is behind its floor: weight x (best - floor), 0 at it."""
        return None if self.cost is None or self.floor_s is None else self.weight * max(self.best_s - self.floor_s, 0.0)

    @property
    def cost(self) -> float | None:
        """Its part of the model's time: weight x best kernel time."""
        return None if self.best_s is None else self.weight * self.best_s


def due_fractions(tasks: list[TaskState]) -> list[float]:
    """Each task's share of the trials: its part of what the model can still gain, over the sum.

    Without floors (or with every task at its floor) that is its part of the model's time, weight
    x best time. With floors it is the time the task is behind ONNX Runtime, weight x (best -
    floor): the model beats ONNX Runtime when the sum of those is gone, and a task twice as slow
    as ORT's nodes for it needs the trials more than a heavier task 2 % behind. A task without a
    floor (matched to no ORT node) is taken to be as far behind, for its time, as the tasks with
    one are together: weight x best x (their gap over their time). A task with no time yet (all
    its candidates failed) is weighed as the costliest one: it still needs a kernel that works."""
    floored = [t for t in tasks if t.gap is not None]
    gap = sum(t.gap for t in floored)
    if gap > 0:
        behind_frac = gap / sum(t.cost for t in floored)
        vals = [t.gap if t.gap is not None else None if t.cost is None else t.cost * behind_frac for t in tasks]
    else:
        vals = [t.cost for t in tasks]
    known = [v for v in vals if v is not None]
    fallback = max(known) if known else 1.0
    costs = [v if v is not None else t.weight * fallback for v, t in zip(vals, tasks)]
    total = sum(costs)
    return [c / total if total > 0 else 1.0 / len(tasks) for c in costs]


def first_round(n_tasks: int, budget: int, batch: int) -> int:
    """Trials each task gets before any task gets more: a batch, but no more than a quarter of
    what the budget gives each task (at least 4). With full batches a small budget over many
    tasks went to the first round alone, tiny layout transforms included, and nothing was left
    for the task furthest behind."""
    return max(1, min(batch, max(4, budget // (4 * max(1, n_tasks)))))


def pick_task(tasks: list[TaskState], batch: int, first: int | None = None) -> int | None:
    """The index of the task to spend the next ``batch`` trials on; None when every task is done.
    ``first``: the trials of a task's first round (default ``batch``); a task with fewer, its
    transfers counted, is still in it."""
    open_ = [i for i, t in enumerate(tasks) if not t.done]
    if not open_:
        return None
    first = batch if first is None else first
    if fresh := [i for i in open_ if tasks[i].spent == 0]:  # heaviest first (there is no time yet)
        return max(fresh, key=lambda i: (tasks[i].weight, -i))
    if short := [i for i in open_ if tasks[i].spent < first]:  # the rest of their first round, costliest first
        return max(short, key=lambda i: (tasks[i].cost or float("inf"), -i))
    behind = [i for i in open_ if not tasks[i].at_floor]
    due = due_fractions(tasks)
    total = sum(t.spent for t in tasks) + batch
    return max(behind or open_, key=lambda i: (due[i] * total - tasks[i].spent, due[i], -i))


def costliest(tasks: list[TaskState]) -> TaskState | None:
    """The task that takes the largest part of the model's time (weight x best time)."""
    measured = [t for t in tasks if t.cost is not None]
    return max(measured, key=lambda t: t.cost) if measured else None
