"""Prune to a latency measured on the target runtime, not to a MACs proxy.

Why: a network with 2x fewer MACs is not 2x faster. On ONNX Runtime the pruned MobileNetV2 at
2.08x fewer MACs ran 1.7x faster, INT8 depthwise kernels are slower than FP32 ones, and widths
off a multiple of 16 cost more than their MACs (benchmarks/RESULTS.md). Every maintained pruning
tool targets a proxy (ratios, MACs, FLOPs, parameters); NetAdapt (Yang et al. 2018) and HALP
(Shen et al. 2022) showed the measured alternative.

How:
1. :mod:`compress.pruning.latency_table` times every layer alone at each width it may get, in the
   precision that will be deployed, on the bench runtime itself.
2. :func:`plan_widths` repeatedly narrows the channel group, to whichever of its candidate
   widths, that removes the least importance per millisecond the table says it saves, until the
   predicted latency meets the goal (a greedy knapsack over the groups). That greedy is myopic:
   importance per millisecond says nothing of what the cuts do together (on the CIFAR-10
   ResNet-8 it emptied whole stages and lost 4.5 points to a plain MACs target at the same
   latency). So :func:`candidate_plans` also plans with the same fraction cut from every group
   and by latency alone, and with a ``judge`` each candidate is cut on a copy and scored; the
   best is kept. The prune stage's judge re-estimates the copy's BatchNorm statistics, fine-tunes
   it a few steps with the teacher and scores it on training images (NetAdapt's short-term
   fine-tune; EagleEye's "adaptive BN" score alone, Li et al. 2020, ranked the CIFAR-10
   candidates opposite to their fine-tuned accuracy): a plan is chosen by what the network can
   still learn, not by a proxy of it.
3. :class:`LatencyPruner` exports the plans as they will be deployed and measures them, best
   judged first (several fresh processes, interleaved with the unpruned network for a
   speed-up), and cuts the first that meets the goal. When none does, it plans again from the
   uncut network, aiming lower by the factor the best plan missed by, so the goal is met by
   measurement, not by prediction; the network is cut once. A plan that beats the goal by a
   margin shows the table understated its saving: the plans are made once more at the goal with
   the savings scaled by that, and a better judged one that also meets it is cut instead. Each
   cut records predicted and measured latency.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.core.fileio import read_json, write_json_atomic
from compress.errors import StageError
from compress.pruning.channels import ChannelGroup, ChannelPruner, GradientFn
from compress.pruning.latency_table import LatencyTable, LayerSite, cached_table, layer_sites
from compress.pruning.spec import LatencyTarget, PruneSpec

MAX_CORRECTIONS = 4  # re-plans after a measured latency above the goal, per cut
MEASURE_ITERATIONS = 200  # timed runs per process of an exported candidate at most
PROCESS_BUDGET_S = 2.0  # seconds of timed runs per process of an exported candidate

Widths = dict[str, tuple[int, int]]  # layer -> (in, out) channels
Judge = Callable[[nn.Module], float]  # a cut candidate network -> its score (higher is better)
PLAN_RULES = ("importance", "uniform", "latency")  # candidate_plans, in this order
# a width saving less than this fraction of its group's largest saving over a wider width is
# not worth its channels (on the CIFAR-10 ResNet-8 table, 56 of 64 channels saved 1.6%, 40 over
# 48 channels 1.5%: cells of one blocked kernel, apart by timing noise)
EFFICIENT_MARGIN = 0.05
# a chosen plan that saves more than (1 + this) times its predicted saving is planned again
# with the savings scaled (LatencyPruner._spend_room); less is within the measurement's noise
ROOM_MARGIN = 0.03


@dataclass(frozen=True)
class LatencyCut:
    """One cut toward a latency goal.

    Attributes:
        goal_ms: the latency this cut aimed at.
        predicted_ms: what the table predicted for the widths cut (from the latency measured
            before the cut).
        measured_ms: the exported network's measured latency after the cut.
        base_ms: the unpruned network's latency measured with it (interleaved processes).
        speedup: ``base_ms / measured_ms``, as the median of the per-process pairs.
        corrections: how many tries missed the goal before this plan met it.
        widths: each group's channels after the cut.
        plans: the candidate plans of the try that was cut (and of its re-planning with room
            left), one :class:`Plan` each (empty without a judge); ``chosen`` names the rule of
            the plan cut.
    """

    goal_ms: float
    predicted_ms: float
    measured_ms: float
    base_ms: float
    speedup: float
    corrections: int
    widths: dict[str, int]
    plans: tuple[Plan, ...] = ()
    chosen: str = "importance"

    @classmethod
    def from_json(cls, record: dict) -> LatencyCut:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in record.items() if k in fields}
        values["plans"] = tuple(Plan(**plan) for plan in record.get("plans", ()))
        return cls(**values)

    def to_json(self) -> dict:
        return {
            "goal_ms": self.goal_ms,
            "predicted_ms": self.predicted_ms,
            "measured_ms": self.measured_ms,
            "base_ms": self.base_ms,
            "speedup": self.speedup,
            "corrections": self.corrections,
            "widths": self.widths,
            "chosen": self.chosen,
            "plans": [dataclasses.asdict(plan) for plan in self.plans],
        }


@dataclass(frozen=True)
class Plan:
    """A candidate plan of a cut: the rule that planned it, the table's predicted latency, the
    judge's score (NaN without a judge; for the prune stage, top-1 % on training images after
    BatchNorm re-estimation and a short fine-tune), each group's width and, if it was measured
    (plans are measured best score first until one meets the goal), its measured latency and
    speed-up over the unpruned network."""

    rule: str
    predicted_ms: float
    score: float
    widths: dict[str, int] = field(default_factory=dict)  # absent from records before 12-01
    measured_ms: float | None = None
    speedup: float | None = None


def candidate_widths(channels: int, spec: PruneSpec, grid: int) -> tuple[int, ...]:
    """The widths a group of ``channels`` may take, widest first: multiples of ``round_to``
    that keep at least ``1 - max_layer_ratio`` of it, at most ``grid`` of them evenly spread
    (always the full width and the narrowest)."""
    step = spec.round_to
    narrowest = max(step, int(np.ceil(channels * (1 - spec.max_layer_ratio) / step)) * step)
    options = [w for w in range(narrowest, channels, step)] + [channels]
    if len(options) > grid:
        picks = np.linspace(0, len(options) - 1, grid).round().astype(int)
        options = [options[i] for i in sorted(set(picks))]
    return tuple(sorted(set(options), reverse=True))


def table_cells(
    sites: list[LayerSite], groups: list[ChannelGroup], options: dict[str, tuple[int, ...]]
) -> dict[str, set[tuple[int, int]]]:
    """Every (in, out) width pair each layer can end up with, given each group's options."""
    ins, outs = _sides(groups, options)
    cells = {}
    for site in sites:
        out_options = outs.get(site.name, (site.out_channels,))
        in_options = ins.get(site.name, (site.in_channels,))
        if site.depthwise:
            cells[site.name] = {(w, w) for w in out_options or in_options}
        else:
            cells[site.name] = {(i, o) for i in in_options for o in out_options}
    return cells


def plan_widths(
    groups: list[ChannelGroup],
    options: dict[str, tuple[int, ...]],
    table: LatencyTable,
    widths: Widths,
    depthwise: set[str],
    start_ms: float,
    goal_ms: float,
) -> tuple[dict[str, int], float]:
    """Group widths predicted to reach ``goal_ms``, losing the least importance per ms saved.

    Args:
        groups: the network's channel groups now, with their channels' importance.
        options: each group's allowed widths (widest first).
        table: per-layer latency cells.
        widths: each layer's (in, out) channels now.
        depthwise: layers whose input width follows their output width.
        start_ms: the network's measured latency now.
        goal_ms: the latency to reach.

    Returns:
        ``(group -> width, predicted ms)``.

    Raises:
        StageError: the narrowest allowed widths are predicted slower than the goal.
    """
    keep = {g.name: g.channels for g in groups}
    order = {g.name: torch.sort(g.importance).values.numpy() for g in groups}
    layers = dict(widths)
    predicted = start_ms
    while predicted > goal_ms:
        best = None
        for group in groups:
            # every narrower width, not only the next: a width off the kernels' blocking can
            # cost more than a narrower one, so the next step may save nothing where two do
            for width in (w for w in options[group.name] if w < keep[group.name]):
                trial = _resized(layers, group, width, depthwise)
                saved = _saved_ms(table, layers, trial)
                if saved <= 0:
                    continue
                removed = group.channels - keep[group.name]
                lost = float(order[group.name][removed : group.channels - width].sum())
                score = lost / saved
                if best is None or score < best[0]:
                    best = (score, group, width, trial, saved)
        if best is None:
            raise StageError(
                f"prune: the latency goal {goal_ms:.3f} ms is out of reach: the narrowest widths "
                f"allowed are predicted at {predicted:.3f} ms; lower the target, raise "
                "max_layer_ratio or ignore fewer layers"
            )
        _, group, width, layers, saved = best
        keep[group.name] = width
        predicted -= saved
    return {name: w for name, w in keep.items()}, predicted


def candidate_plans(
    groups: list[ChannelGroup],
    options: dict[str, tuple[int, ...]],
    table: LatencyTable,
    widths: Widths,
    depthwise: set[str],
    start_ms: float,
    goal_ms: float,
) -> dict[str, tuple[dict[str, int], float]]:
    """Plans predicted to reach ``goal_ms``, one per rule of :data:`PLAN_RULES` that reaches it
    (duplicates dropped, the earlier rule kept):

    * ``importance``: :func:`plan_widths` on the criterion's importance (Torch-Pruning's,
      normalised by each group's mean);
    * ``uniform``: the same fraction cut from every group (the smallest, on a 1% grid, whose
      widths reach the goal), each group at its :func:`efficient_widths` nearest that fraction:
      what a ratio or MACs schedule does with the runtime's channel blocking as ``round_to``;
    * ``latency``: :func:`plan_widths` where every channel of a group weighs 1 / its channels:
      the most milliseconds per fraction of a group, importance ignored.

    Returns:
        rule -> ``(group -> width, predicted ms)``.

    Raises:
        StageError: no rule reaches the goal (the ``importance`` rule's error).
    """
    plan = {"widths": widths, "depthwise": depthwise, "start_ms": start_ms, "goal_ms": goal_ms}
    reweighted = {
        "importance": groups,
        "latency": [
            dataclasses.replace(g, importance=torch.full((g.channels,), 1.0 / g.channels))
            for g in groups
        ],
    }
    plans, first_error = {}, None
    for rule in PLAN_RULES:
        try:
            if rule == "uniform":
                found = _uniform_plan(groups, options, table, **plan)
            else:
                found = plan_widths(reweighted[rule], options, table, **plan)
        except StageError as error:
            first_error = first_error or error
            continue
        if found is not None and found[0] not in [p[0] for p in plans.values()]:
            plans[rule] = found
    if not plans:
        raise first_error
    return plans


def efficient_widths(
    groups: list[ChannelGroup],
    options: dict[str, tuple[int, ...]],
    table: LatencyTable,
    widths: Widths,
    depthwise: set[str],
) -> dict[str, tuple[int, ...]]:
    """Each group's options that the table says are worth having: a width is kept only if it
    saves more time than every wider one kept, by ``EFFICIENT_MARGIN`` of the most the group can
    save (less is within the table's noise), the group alone resized (widest first).

    Why: a runtime's kernels cost by blocks of channels (ONNX Runtime's INT8 convolutions by 16
    output channels), so a width off the block saves nothing over the next wider one and a
    narrower one can even cost more (on the CIFAR-10 ResNet-8, 56 of 64 channels ran as slow as
    64, and 8 slower than 16). A rule that cuts every group alike must land on these widths.
    """
    kept = {}
    for group in groups:
        saved = {
            w: _saved_ms(table, widths, _resized(widths, group, w, depthwise))
            for w in options[group.name][1:]
        }
        margin = EFFICIENT_MARGIN * max(list(saved.values()) + [0.0])
        best, widths_kept = 0.0, [options[group.name][0]]
        for width, ms in saved.items():
            if ms > best + margin:
                best = ms
                widths_kept.append(width)
        kept[group.name] = tuple(widths_kept)
    return kept


def _uniform_plan(groups, options, table, *, widths, depthwise, start_ms, goal_ms):
    """The smallest fraction f (1% steps) such that every group at its efficient width nearest
    (1 - f) of its channels (ties: the wider) is predicted at or under ``goal_ms``; None if
    none is."""
    efficient = efficient_widths(groups, options, table, widths, depthwise)
    for percent in range(1, 101):
        keep = {}
        layers = dict(widths)
        for group in groups:
            wanted = group.channels * (1 - percent / 100)
            keep[group.name] = min(efficient[group.name], key=lambda w: (abs(w - wanted), -w))
            layers = _resized(layers, group, keep[group.name], depthwise)
        predicted = start_ms - _saved_ms(table, widths, layers)
        if predicted <= goal_ms:
            return keep, predicted
    return None


class LatencyPruner:
    """Cuts a network toward latency goals measured on a bench runtime (see the module docstring).

    Args:
        model: the network, pruned in place.
        example_inputs: a batch shaped like the real input (normalised, on the model's device).
        spec: the prune spec; ``spec.target`` says the runtime, batch, threads and grid.
        backend: the :class:`compress.benchmark.backend_table.Backend` that measures.
        precision: "fp32" or "int8": how the network is exported to be measured.
        calibration: input batches for the INT8 export's calibration (a few suffice: latency does
            not depend on the scales).
        num_classes: the classifier's outputs (never pruned).
        cache: folder where the latency table is kept (None: a temporary one).
        gradient_fn: for the ``taylor`` criterion.
        cpu: the CPU, recorded with the table.
        log: called with one line per measurement.
        judge: scores a cut copy of the network (higher is better; the prune stage re-estimates
            its BatchNorm statistics, fine-tunes it briefly and returns top-1 on training
            images: :func:`compress.pipeline.stages.prune.plan_judge`); each cut then
            chooses among :func:`candidate_plans`. None: the ``importance`` plan alone.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor,
        spec: PruneSpec,
        *,
        backend,
        precision: str,
        calibration: list[torch.Tensor] | None,
        num_classes: int,
        cache: Path | None = None,
        gradient_fn: GradientFn | None = None,
        cpu: str = "",
        log=None,
        judge: Judge | None = None,
    ):
        self.model, self.example, self.spec = model, example_inputs, spec
        self.judge, self.num_classes = judge, num_classes
        self.target: LatencyTarget = spec.target
        self.backend, self.precision = backend, precision
        self.calibration = calibration or [example_inputs]
        self.gradient_fn, self.log = gradient_fn, log or (lambda line: None)
        self._folder = tempfile.TemporaryDirectory(prefix="compress-latency-")
        self.pruner = ChannelPruner(model, example_inputs, spec, num_classes=num_classes)
        self.sites = layer_sites(model, example_inputs)
        self.depthwise = {s.name for s in self.sites if s.depthwise}
        groups = self.pruner.channel_groups(gradient_fn)
        self.options = {
            g.name: candidate_widths(g.channels, spec, self.target.grid) for g in groups
        }
        self.table = cached_table(
            cache or Path(self._folder.name),
            self.sites,
            table_cells(self.sites, groups, self.options),
            backend,
            batch_size=self.target.batch_size,
            threads=self.target.threads,
            precision=precision,
            cpu=cpu,
        )
        self.base_file = self._export(model, "base")
        self.base_ms = self.current_ms = self._measure([self.base_file])[0]
        # the layers' shares from the table, the network's total from its measurement
        self.table = self.table.scaled_to(self.base_ms, self._layer_widths())
        self.log(f"latency: unpruned {self.base_ms:.3f} ms on {backend.name} ({precision})")

    def goal_ms(self) -> float:
        """The final latency goal in ms (for a speed-up: the measured unpruned latency over it)."""
        if self.target.latency_ms is not None:
            return self.target.latency_ms
        return self.base_ms / self.target.latency_speedup

    def step_goals(self, steps: int) -> list[float]:
        """A geometric schedule of latency goals from the unpruned network to the final goal."""
        goal = self.goal_ms()
        if goal >= self.base_ms:
            raise StageError(
                f"prune: the unpruned network already runs in {self.base_ms:.3f} ms <= the "
                f"target {goal:.3f} ms; nothing to prune"
            )
        return [self.base_ms * (goal / self.base_ms) ** (k / steps) for k in range(1, steps + 1)]

    def cut(self, goal_ms: float) -> LatencyCut:
        """Cut the network once, by a plan whose exported network meets ``goal_ms`` by
        measurement: for a speed-up target, its pairwise ratio with the unpruned network reaches
        ``base_ms / goal_ms``; for a latency target, its measured latency is at most ``goal_ms``.

        Each try plans from the network as it is before this cut, for an aim (first the goal).
        Its plans are measured best-judged first, each on a copy, until one meets the goal: that
        one is cut. The table's error differs from plan to plan (on the CIFAR-10 ResNet-8 one
        plan measured 1% over its prediction, another 10%), so a plan is taken for what it
        measures, and a near miss of the best plan costs the next plan, not a deeper one. When
        none meets it, the next try aims lower by the factor the best plan missed by. A plan
        proposed again is neither cut, judged nor measured twice. (Stacking cuts instead took
        the ResNet-8 from 1.27x to 3.1x fewer MACs on a 1% miss.)

        Raises:
            StageError: the goal is predicted out of reach, or still missed after
                ``MAX_CORRECTIONS`` re-plans.
        """
        groups = self.pruner.channel_groups(self.gradient_fn)
        aim, tries, judged, measured = goal_ms, 0, {}, {}
        while True:
            plans = self._plans(groups, self.current_ms, aim, judged, self.table)
            if all(_key(plan.widths) in measured for plan in plans):
                aim *= 0.99  # the options are coarse: aim lower until a plan changes
                continue
            tries += 1
            chosen = None
            for plan in plans:  # best judged first
                key = _key(plan.widths)
                if key not in measured:
                    # BN stats don't matter
                    measured[key] = self._measure_candidate(self._network_of(plan, judged))
                    ms, speedup = measured[key]
                    self.log(
                        f"latency: plan {plan.rule!r} predicted {plan.predicted_ms:.3f} ms "
                        f"(aim {aim:.3f} ms), measured {ms:.3f} ms (goal {goal_ms:.3f} ms, "
                        f"{speedup:.2f}x the unpruned network)"
                    )
                if self._met(goal_ms, *measured[key]):
                    chosen = plan
                    break
            if chosen is not None:
                break
            if tries > MAX_CORRECTIONS:
                ms, speedup = measured[_key(plans[0].widths)]
                raise StageError(
                    f"prune: measured {ms:.3f} ms ({speedup:.2f}x) after "
                    f"{MAX_CORRECTIONS} corrections, short of the goal {goal_ms:.3f} ms; the "
                    "table's predictions miss on this runtime (see the log)"
                )
            aim *= self._reached(goal_ms, *measured[_key(plans[0].widths)])
        if self.judge is not None:
            chosen, plans = self._spend_room(groups, goal_ms, chosen, plans, judged, measured)
        self.pruner.keep(groups, chosen.widths)
        self.current_ms, speedup = measured[_key(chosen.widths)]
        return LatencyCut(
            goal_ms=goal_ms,
            predicted_ms=chosen.predicted_ms,
            measured_ms=self.current_ms,
            base_ms=self.base_ms,
            speedup=speedup,
            corrections=tries - 1,
            widths=chosen.widths,
            plans=tuple(_with_measurement(p, measured) for p in plans) if self.judge else (),
            chosen=chosen.rule,
        )

    def preview(self, goal_ms: float) -> list[Plan]:
        """The plans a cut toward ``goal_ms`` would weigh (best judged first; without a judge the
        importance plan alone), each measured as a cut would measure it; nothing is cut.

        Why: how far the table's predictions are from the runtime, plan by plan, without
        fine-tuning anything (``benchmarks/latency_table_error.py``); a cut measures only until
        one plan meets its goal.
        """
        groups = self.pruner.channel_groups(self.gradient_fn)
        judged: dict = {}
        plans = self._plans(groups, self.current_ms, goal_ms, judged, self.table)
        measured = {
            _key(plan.widths): self._measure_candidate(self._network_of(plan, judged))
            for plan in plans
        }
        return [_with_measurement(plan, measured) for plan in plans]

    def recorded_cut(self, goal_ms: float, path: Path, key: str) -> LatencyCut:
        """:meth:`cut` toward ``goal_ms``, its record written to ``path`` under ``key``; a
        readable record of the same key there is replayed instead (:meth:`replay`), so a resumed
        run gets the network its fine-tuning checkpoints belong to."""
        try:
            record = read_json(path) if path.is_file() else None
        except (OSError, ValueError):
            record = None  # unreadable: cut again
        if isinstance(record, dict) and record.get("key") == key and "cut" in record:
            return self.replay(record["cut"])
        cut = self.cut(goal_ms)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"key": key, "cut": cut.to_json()})
        return cut

    def replay(self, record: dict) -> LatencyCut:
        """Cut again what a recorded cut (:meth:`LatencyCut.to_json`) cut, without planning or
        measuring: a resumed stage gets the same network its fine-tuning checkpoint was saved
        from (measurements differ from run to run, and so would a new plan)."""
        cut = LatencyCut.from_json(record)
        self.pruner.keep(self.pruner.channel_groups(self.gradient_fn), cut.widths)
        self.current_ms = cut.measured_ms
        self.log(f"latency: cut replayed from its record ({cut.measured_ms:.3f} ms measured then)")
        return cut

    def _spend_room(
        self, groups, goal_ms: float, chosen: Plan, plans: list[Plan], judged: dict, measured: dict
    ) -> tuple[Plan, list[Plan]]:
        """``(plan to cut, plans considered)``: when the chosen plan saved more than the table
        predicted (by over ``ROOM_MARGIN``), one more planning at the goal with every saving
        scaled by that factor; a new plan judged better than the chosen one that also meets the
        goal by measurement replaces it.

        Why: a plan that beats its goal wastes accuracy on latency nobody asked for. The table
        underestimates some cuts (on the CIFAR-10 ResNet-8, scaled cells predicted 3-14% less
        than cuts measured); the measurement of the chosen plan says by how much, and a less
        deep plan can spend it.
        """
        ms, speedup = measured[_key(chosen.widths)]
        achieved_ms = self.base_ms / speedup if self.target.latency_speedup is not None else ms
        predicted_saving = self.current_ms - chosen.predicted_ms
        factor = (self.current_ms - achieved_ms) / predicted_saving if predicted_saving > 0 else 1
        if factor <= 1 + ROOM_MARGIN:
            return chosen, plans
        self.log(
            f"latency: plan {chosen.rule!r} saved {factor:.2f}x what the table predicted; "
            "planning again at the goal with every saving scaled by that"
        )
        try:
            again = self._plans(groups, self.current_ms, goal_ms, judged, self.table.scaled(factor))
        except StageError:
            return chosen, plans
        seen = {_key(plan.widths) for plan in plans}
        considered = plans + [plan for plan in again if _key(plan.widths) not in seen]
        for plan in again:  # best judged first
            if plan.score <= chosen.score:
                break
            key = _key(plan.widths)
            if key not in measured:
                measured[key] = self._measure_candidate(judged[key][0])
                self.log(
                    f"latency: plan {plan.rule!r} predicted {plan.predicted_ms:.3f} ms with the "
                    f"scaled table, measured {measured[key][0]:.3f} ms ({measured[key][1]:.2f}x)"
                )
            if self._met(goal_ms, *measured[key]):
                return plan, considered
        return chosen, considered

    def _plans(
        self,
        groups: list[ChannelGroup],
        start_ms: float,
        goal_ms: float,
        judged: dict,
        table: LatencyTable,
    ) -> list[Plan]:
        """The plans predicted to reach ``goal_ms``, best judged first (ties: the earlier rule);
        the importance plan alone without a judge. ``judged`` keeps each cut copy and its score
        by widths across the tries of one cut, so a plan proposed again is neither cut nor
        judged twice (and its copy is the one measured)."""
        layers = self._layer_widths()
        if self.judge is None:
            widths, predicted = plan_widths(
                groups, self.options, table, layers, self.depthwise, start_ms, goal_ms
            )
            return [Plan("importance", predicted, float("nan"), widths)]
        plans = []
        found = candidate_plans(
            groups, self.options, table, layers, self.depthwise, start_ms, goal_ms
        )
        for rule, (widths, predicted) in found.items():
            if _key(widths) not in judged:  # logged once: a lower aim often plans it again
                network = self._cut_copy(widths)
                judged[_key(widths)] = network, self.judge(network)
                self.log(
                    f"latency: plan {rule!r} predicted {predicted:.3f} ms, "
                    f"scored {judged[_key(widths)][1]:.2f}"
                )
            plans.append(Plan(rule, predicted, judged[_key(widths)][1], widths))
        return sorted(plans, key=lambda plan: -plan.score)  # stable: ties keep the rule order

    def _network_of(self, plan: Plan, judged: dict) -> nn.Module:
        """The plan's cut copy: the one its judge scored, or a new one (no judge)."""
        return judged.get(_key(plan.widths), (None,))[0] or self._cut_copy(plan.widths)

    def _cut_copy(self, widths: dict[str, int]) -> nn.Module:
        """A copy of the network cut to ``widths`` (the network itself is left alone)."""
        network = copy.deepcopy(self.model)
        pruner = ChannelPruner(network, self.example, self.spec, num_classes=self.num_classes)
        pruner.keep(pruner.channel_groups(self.gradient_fn), widths)
        return network

    def _met(self, goal_ms: float, measured_ms: float, speedup: float) -> bool:
        """A speed-up goal is judged by the pairwise ratio measured with the unpruned network (a
        load that slows both cancels), a latency goal by the measured milliseconds."""
        if self.target.latency_speedup is None:
            return measured_ms <= goal_ms
        return speedup >= self.base_ms / goal_ms * (1 - 1e-9)

    def _reached(self, goal_ms: float, measured_ms: float, speedup: float) -> float:
        """How far a missed try got toward the goal, below 1: what scales the next aim."""
        if self.target.latency_speedup is None:
            return goal_ms / measured_ms
        return speedup / (self.base_ms / goal_ms)

    def _measure_candidate(self, network: nn.Module) -> tuple[float, float]:
        """(median latency, median pairwise speed-up over the unpruned network) of ``network``."""
        path = self._export(network, "candidate")
        if self.target.latency_speedup is None:
            ms = self._measure([path])[0]
            return ms, self.base_ms / ms
        per_process = self._measure_processes([self.base_file, path])
        ratios = [base / ours for base, ours in zip(*per_process, strict=True)]
        return statistics.median(per_process[1]), statistics.median(ratios)

    def _measure(self, paths: list[Path]) -> list[float]:
        return [statistics.median(times) for times in self._measure_processes(paths)]

    def _measure_processes(self, paths: list[Path]) -> list[list[float]]:
        target = self.target
        return interleaved_p50(
            self.backend, paths, target.batch_size, target.threads, target.processes
        )

    def _export(self, model: nn.Module, name: str) -> Path:
        """The network as it will be deployed: FP32 ONNX, or calibrated QDQ INT8 ONNX."""
        from compress.exporters.network import export_network
        from compress.exporters.spec import ExportConfig
        from compress.quantization.fake_quant import calibrate, prepare_quantized

        network = copy.deepcopy(model).cpu().eval()
        inputs = self.example[:1].cpu()
        spec = None
        if self.precision == "int8":
            batches = [batch.cpu() for batch in self.calibration[:2]]
            # ONNX Runtime's integer kernels: what the quantize stage's default target exports
            network = prepare_quantized(
                network, target="onnxruntime-cpu", example_inputs=batches[0]
            )
            calibrate(network, batches, method="minmax")
            network, spec = network.eval(), network.quant_spec
        path = Path(self._folder.name) / f"{name}.onnx"
        export_network(
            network,
            path,
            ExportConfig(),
            inputs.numpy(),
            {},
            spec,
            image_size=inputs.shape[-1],
            in_channels=inputs.shape[1],
            warn=False,
        )
        return path

    def _layer_widths(self) -> Widths:
        modules = dict(self.model.named_modules())
        out = {}
        for site in self.sites:
            layer = modules[site.name]
            if isinstance(layer, nn.Conv2d):
                out[site.name] = (layer.in_channels, layer.out_channels)
            else:
                out[site.name] = (layer.in_features, layer.out_features)
        return out


def interleaved_p50(
    backend, paths: list[Path], batch_size: int, threads: int, processes: int
) -> list[list[float]]:
    """Each file's p50 latency (ms) in ``processes`` fresh processes of ``backend``, visited
    A B A B (:func:`compress.benchmark.latency.measure_interleaved`, the bench's own
    measurement): a per-process bias of the runtime then falls on every file alike, and ratios
    are taken pair by pair.

    Raises:
        StageError: a measurement failed.
    """
    from compress.benchmark.latency import LatencyJob, measure_interleaved
    from compress.benchmark.spec import BenchConfig

    settings = BenchConfig(
        warmup=10,
        iterations=MEASURE_ITERATIONS,
        time_budget_s=PROCESS_BUDGET_S * processes,
        threads=threads,
        processes=processes,
    )
    jobs = [LatencyJob(Path(path), (batch_size,)) for path in paths]
    times = []
    for path, result in zip(paths, measure_interleaved(backend, jobs, settings), strict=True):
        if result.get("status") != "ok":
            raise StageError(f"measuring {Path(path).name}: {result.get('error')}")
        times.append([process["p50_ms"] for process in result["batches"][0]["processes"]])
    return times


def _sides(groups: list[ChannelGroup], options: dict[str, tuple[int, ...]]):
    """layer -> the width options of its input, and of its output."""
    ins, outs = {}, {}
    for group in groups:
        for name in group.outs:
            outs[name] = options[group.name]
        for name in group.ins:
            ins[name] = options[group.name]
    return ins, outs


def _with_measurement(plan: Plan, measured: dict) -> Plan:
    """``plan`` with its measured latency and speed-up, if it was measured."""
    if _key(plan.widths) not in measured:
        return plan
    ms, speedup = measured[_key(plan.widths)]
    return dataclasses.replace(plan, measured_ms=ms, speedup=speedup)


def _key(widths: dict[str, int]) -> tuple:
    return tuple(sorted(widths.items()))


def _saved_ms(table: LatencyTable, before: Widths, after: Widths) -> float:
    """What the table says the layers that changed width save."""
    return sum(
        table.cost(name, *before[name]) - table.cost(name, *after[name])
        for name in after
        if after[name] != before[name]
    )


def _resized(layers: Widths, group: ChannelGroup, width: int, depthwise: set[str]) -> Widths:
    """Layer widths after ``group`` takes ``width`` channels (a depthwise layer's both sides)."""
    out = dict(layers)
    for name in group.outs:
        if name in out:
            cin, _ = out[name]
            out[name] = (width if name in depthwise else cin, width)
    for name in group.ins:
        if name in out:
            _, cout = out[name]
            out[name] = (width, width if name in depthwise else cout)
    return out
