"""Measurements shared by the early-exit speed benchmarks (imported by the scripts beside it).

Everything is measured side by side in one process, interleaved, so machine load (other jobs on
the same cores) hits every path alike; every figure is a median over repeats. Every path runs
under inference mode, as real early exit's loop does (``jei.model.stream_exits``), so the
backbone alone is timed like for like.

- ``timed_pass``: the all-exits pass run segment by segment with a timer around each backbone
  segment and each exit's head (representation, IM, temperature, gate, policy step). The
  segment times give each exit's **share of the backbone's time**: the cumulative time up to
  exit l over the whole backbone's. Weighting those shares by the fraction of samples that
  take each exit gives the **latency-weighted ideal**: the time ratio real early exit would
  reach if stopping a sample cost nothing (no compaction, no heads) and a segment's time
  scaled with the samples it runs on. ``ideal + heads`` adds the measured head times.
- ``timed_running_segments``: the segments alone, each on the samples real early exit runs
  it on: the **ideal at running batch sizes**, which keeps what kernels lose or gain on smaller
  batches (the linear ideal assumes neither) and leaves out heads and compaction.
- ``measure_batches``: per round, over the same batches, the backbone alone
  (``network.backbone(x)``), real early exit, the timed pass and the running segments, their
  order rotating round by round; the time ratio is the median over rounds of each round's
  early-exit/backbone ratio.
- ``measure_latency``: the same on one image at a time: p50 and p99 latency of both paths, and
  the ratio of mean latencies against the ideal from batch-1 segment shares.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, TypeVar

import torch
from torch import Tensor

from jei.cost import measure_exit_costs
from jei.model import EarlyExitNetwork, skippable_exits

T = TypeVar("T")

CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,
    # CPU seconds of this process: with one torch thread, the work itself, without the time the
    # OS gave the core to other jobs (far steadier than wall time on a shared machine; with more
    # threads it would count their spin-waits too).
    "cpu": time.process_time,
}


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What to call before reading a clock: waits for queued GPU work; nothing on the CPU."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def timed_call(fn: Callable[[Any], Any], x: Any, sync: Callable[[], None], clock: Callable[[], float]) -> float:
    """Seconds of one call ``fn(x)``, queued device work included."""
    sync()
    start = clock()
    fn(x)
    sync()
    return clock() - start


@torch.inference_mode()
def timed_pass(
    network: EarlyExitNetwork, inputs: Any, sync: Callable[[], None], clock: Callable[[], float] = time.perf_counter
) -> tuple[list[float], list[float]]:
    """Seconds spent in each backbone segment (G+1) and each exit's head (G), all samples.

    A head is what real early exit runs at an exit: representation, IM, temperature, the gate
    (unless the policy does not read gates) and the policy's step."""
    backbone, policy = network.backbone, network.policy
    total = backbone.batch_size(inputs)
    segments, heads = [], []
    decision = None
    may_leave = skippable_exits(policy, network.ensemble_decay, network.reads_history)
    sync()
    start = clock()
    state = backbone.begin(inputs)
    for index in range(network.num_gates + 1):
        state = backbone.run_segment(index, state)
        sync()
        now = clock()
        segments.append(now - start)
        start = now
        if index == network.num_gates:
            break
        if may_leave is not None and not may_leave(index):  # real early exit skips this exit whole
            heads.append(0.0)
            continue
        logits = network._scaled(network.ims[index](backbone.represent(index, state)), index)
        if decision is None:
            decision = policy.begin(total, logits.device)
        gate_logit = network.gates[index](logits) if getattr(policy, "uses_gates", True) else logits.new_zeros(total)
        _, decision = policy.step(index, logits, gate_logit, decision)
        sync()
        now = clock()
        heads.append(now - start)
        start = now
    return segments, heads


@torch.inference_mode()
def timed_running_segments(
    network: EarlyExitNetwork, inputs: Any, exit_index: Tensor, sync: Callable[[], None],
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Seconds of the backbone's segments alone, each run on exactly the samples real early exit
    runs it on (those with ``exit_index`` >= the segment): early exit without its heads and
    with compaction left out of the timing. Against the linear ideal, it is what the kernels
    lose (or gain) on the smaller batches; against real early exit, what heads and compaction add."""
    backbone = network.backbone
    state, seconds = backbone.begin(inputs), 0.0
    for index in range(network.num_gates + 1):
        sync()
        start = clock()
        state = backbone.run_segment(index, state)
        sync()
        seconds += clock() - start
        if index < network.num_gates:
            staying = (exit_index > index).nonzero().squeeze(-1)
            if len(staying) == 0:
                break
            state, exit_index = backbone.select(state, staying), exit_index[staying]
    return seconds


def cumulative_shares(segment_seconds: Sequence[float]) -> list[float]:
    """Share of the backbone's time spent up to (and including) each segment: ends at 1."""
    total, running, shares = sum(segment_seconds), 0.0, []
    for seconds in segment_seconds:
        running += seconds
        shares.append(running / total)
    return shares


def ideal_ratio(fractions: Sequence[float], shares: Sequence[float]) -> float:
    """The latency-weighted ideal: sum over exits of (fraction exiting there) x (share up to it)."""
    return float(sum(f * s for f, s in zip(fractions, shares)))


def exit_fractions(exit_index: Tensor, num_exits: int) -> list[float]:
    counts = torch.bincount(exit_index.cpu(), minlength=num_exits).double()
    return (counts / counts.sum()).tolist()


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (linear interpolation between order statistics)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _median_by_index(rows: Sequence[Sequence[float]]) -> list[float]:
    return [statistics.median(column) for column in zip(*rows)]


@dataclass
class BatchResult:
    batch_size: int
    samples: int
    rounds: int
    backbone_seconds: float  # median over rounds, all batches
    early_exit_seconds: float
    time_ratio: float  # median over rounds of early/backbone
    time_ratio_quartiles: tuple[float, float]
    exit_fractions: list[float]
    expected_cost: float  # mul-add fraction of the exits taken
    segment_shares: list[float]  # cumulative, per exit (G+1 values, ends at 1)
    head_shares: list[float]  # cumulative head time per exit over the backbone's time (G+1 values)
    ideal: float  # latency-weighted ideal from backbone segment shares
    ideal_with_heads: float
    reference_ratio: float | None = None  # another early-exit implementation (--reference-rev)
    running_ideal: float = 0.0  # segments alone at the running batch sizes, over the backbone
    backbone_images_per_second: float = 0.0
    early_exit_images_per_second: float = 0.0
    over_ideal: float = 0.0  # time_ratio / ideal
    over_running_ideal: float = 0.0  # time_ratio / running_ideal: what heads and compaction add

    def __post_init__(self) -> None:
        self.backbone_images_per_second = self.samples / self.backbone_seconds
        self.early_exit_images_per_second = self.samples / self.early_exit_seconds
        self.over_ideal = self.time_ratio / self.ideal
        self.over_running_ideal = self.time_ratio / self.running_ideal if self.running_ideal else 0.0


@dataclass
class LatencyResult:
    images: int
    backbone_ms: dict[str, float]  # p50, p99, mean
    early_exit_ms: dict[str, float]
    time_ratio: float  # mean early / mean backbone latency
    time_ratio_p50: float
    exit_fractions: list[float]
    expected_cost: float
    segment_shares: list[float]
    ideal: float
    ideal_with_heads: float
    reference_ratio: float | None = None
    over_ideal: float = 0.0

    def __post_init__(self) -> None:
        self.over_ideal = self.time_ratio / self.ideal


def _shares(segments: Sequence[float], heads: Sequence[float]) -> tuple[list[float], list[float]]:
    seg_shares = cumulative_shares(segments)
    total, running, head_shares = sum(segments), 0.0, []
    for index in range(len(segments)):
        if index < len(heads):
            running += heads[index]
        head_shares.append(running / total)
    return seg_shares, head_shares


def exit_costs(network: EarlyExitNetwork, example: Any) -> Tensor:
    """Each exit's cumulative mul-adds over the whole network's (``jei.cost``)."""
    return measure_exit_costs(network, example).normalized.float()


def _add_time(times: dict[str, float], name: str, once: Callable[..., float], fn: Callable[[Any], Any], x: Any) -> None:
    times[name] += once(fn, x)


def _add_pass(
    segments_sum: list[float], heads_sum: list[float], network: EarlyExitNetwork, x: Any,
    sync: Callable[[], None], clock: Callable[[], float],
) -> None:
    segments, heads = timed_pass(network, x, sync, clock)
    for i, value in enumerate(segments):
        segments_sum[i] += value
    for i, value in enumerate(heads):
        heads_sum[i] += value


def _add_running(
    times: dict[str, float], network: EarlyExitNetwork, x: Any, exit_index: Tensor,
    sync: Callable[[], None], clock: Callable[[], float],
) -> None:
    times["running"] += timed_running_segments(network, x, exit_index, sync, clock)


def rotated(items: list[T], shift: int) -> list[T]:
    """``items`` started at position ``shift`` (modulo their number): the order of one round."""
    shift %= len(items)
    return items[shift:] + items[:shift]


@torch.inference_mode()
def measure_batches(
    network: EarlyExitNetwork,
    batches: Sequence[Any],
    rounds: int,
    costs: Tensor,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
    reference: Callable[[Any], Any] | None = None,
) -> BatchResult:
    """Backbone alone, real early exit and the timed pass on the same ``batches``.

    Interleaved batch by batch (the three paths run back to back on one batch, in an order
    that rotates), so a change in machine load lands on all three; a round's time is the sum
    over its batches, and the ratio is the median over rounds of each round's ratio.
    ``reference``, another early-exit implementation, joins the rotation when given.
    """
    sync = synchronizer(device)
    backbone = network.backbone
    num_exits = network.num_gates + 1

    once = partial(timed_call, sync=sync, clock=clock)

    exit_indices = [network.early_exit(x).exit_index for x in batches]  # also warms up
    exits = torch.cat([e.cpu() for e in exit_indices])
    for x in batches:
        backbone(x)
    full, early, references, running, segment_rows, head_rows = [], [], [], [], [], []
    for round_index in range(rounds):
        times = {"backbone": 0.0, "early": 0.0, "reference": 0.0, "running": 0.0}
        segments_sum, heads_sum = [0.0] * num_exits, [0.0] * (num_exits - 1)
        for batch_index, x in enumerate(batches):
            steps = [
                partial(_add_time, times, "backbone", once, backbone, x),
                partial(_add_time, times, "early", once, network.early_exit, x),
                partial(_add_pass, segments_sum, heads_sum, network, x, sync, clock),
                partial(_add_running, times, network, x, exit_indices[batch_index], sync, clock),
            ]
            if reference is not None:
                steps.append(partial(_add_time, times, "reference", once, reference, x))
            for step in rotated(steps, round_index + batch_index):
                step()
        full.append(times["backbone"])
        early.append(times["early"])
        references.append(times["reference"])
        running.append(times["running"])
        segment_rows.append(segments_sum)
        head_rows.append(heads_sum)
    ratios = [e / f for e, f in zip(early, full)]
    segments, heads = _median_by_index(segment_rows), _median_by_index(head_rows)
    seg_shares, head_shares = _shares(segments, heads)
    fractions = exit_fractions(exits, num_exits)
    return BatchResult(
        batch_size=backbone.batch_size(batches[0]),
        samples=sum(backbone.batch_size(x) for x in batches),
        rounds=rounds,
        backbone_seconds=statistics.median(full),
        early_exit_seconds=statistics.median(early),
        time_ratio=statistics.median(ratios),
        time_ratio_quartiles=(quantile(ratios, 0.25), quantile(ratios, 0.75)),
        exit_fractions=fractions,
        expected_cost=float(costs[exits].mean()),
        segment_shares=seg_shares,
        head_shares=head_shares,
        ideal=ideal_ratio(fractions, seg_shares),
        ideal_with_heads=ideal_ratio(fractions, [s + h for s, h in zip(seg_shares, head_shares)]),
        reference_ratio=None if reference is None else statistics.median([r / f for r, f in zip(references, full)]),
        running_ideal=statistics.median([r / f for r, f in zip(running, full)]),
    )


@torch.inference_mode()
def measure_latency(
    network: EarlyExitNetwork,
    images: Sequence[Any],
    costs: Tensor,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
    repeats: int = 1,
    warmup: int = 5,
    reference: Callable[[Any], Any] | None = None,
) -> LatencyResult:
    """One image at a time: backbone, early exit and the timed pass back to back on each image
    (order rotating), ``repeats`` times over the images; ``reference`` too when given."""
    sync = synchronizer(device)
    backbone = network.backbone
    num_exits = network.num_gates + 1

    once = partial(timed_call, sync=sync, clock=clock)

    for x in images[:warmup]:
        backbone(x), network.early_exit(x), timed_pass(network, x, sync, clock)
    exits = torch.cat([network.early_exit(x).exit_index.cpu() for x in images])
    full, early, references, segment_rows, head_rows = [], [], [], [], []
    for repeat in range(repeats):
        for position, x in enumerate(images):
            def timed(x: Any = x) -> None:
                segments, heads = timed_pass(network, x, sync, clock)
                segment_rows.append(segments)
                head_rows.append(heads)

            steps = [lambda x=x: full.append(once(backbone, x)), lambda x=x: early.append(once(network.early_exit, x)), timed]
            if reference is not None:
                steps.append(lambda x=x: references.append(once(reference, x)))
            for step in rotated(steps, position + repeat):
                step()
    segments, heads = _median_by_index(segment_rows), _median_by_index(head_rows)
    seg_shares, head_shares = _shares(segments, heads)
    fractions = exit_fractions(exits, num_exits)

    def summary(values: list[float]) -> dict[str, float]:
        return {"p50": 1e3 * quantile(values, 0.5), "p99": 1e3 * quantile(values, 0.99), "mean": 1e3 * statistics.fmean(values)}

    # The ideal of one image is the share of the backbone up to its own exit; averaged over the
    # images, the ideal of the mean latency. Per-segment medians keep load spikes out of it.
    return LatencyResult(
        images=len(images),
        backbone_ms=summary(full),
        early_exit_ms=summary(early),
        time_ratio=statistics.fmean(early) / statistics.fmean(full),
        time_ratio_p50=quantile(early, 0.5) / quantile(full, 0.5),
        exit_fractions=fractions,
        expected_cost=float(costs[exits].mean()),
        segment_shares=seg_shares,
        ideal=ideal_ratio(fractions, seg_shares),
        ideal_with_heads=ideal_ratio(fractions, [s + h for s, h in zip(seg_shares, head_shares)]),
        reference_ratio=statistics.fmean(references) / statistics.fmean(full) if references else None,
    )


def as_dict(result: Any) -> dict[str, Any]:
    return asdict(result)


@dataclass
class Row:
    """One line of the summary tables."""

    setup: str
    policy: str
    batch: BatchResult | None = None
    latency: LatencyResult | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _reference(value: float | None) -> str:
    return "" if value is None else f" {value:.3f} |"


def markdown_tables(rows: Sequence[Row]) -> str:
    """The batch and batch-1 tables, as the README shows them (with a column for the reference
    implementation when one was timed)."""
    with_reference = any(r.batch is not None and r.batch.reference_ratio is not None for r in rows)
    extra_head, extra_rule = (" reference ratio |", "---|") if with_reference else ("", "")
    lines = [
        "| setup | policy | mul-add cost | ideal | ideal at running batch sizes | ideal + heads | time ratio (median [IQR]) "
        "| ratio / ideal | ratio / running ideal | images/s backbone → early exit |" + extra_head,
        "|---|---|---|---|---|---|---|---|---|---|" + extra_rule,
    ]
    for row in rows:
        if row.batch is None:
            continue
        b = row.batch
        q1, q3 = b.time_ratio_quartiles
        lines.append(
            f"| {row.setup} | {row.policy} | {b.expected_cost:.3f} | {b.ideal:.3f} | {b.running_ideal:.3f} | {b.ideal_with_heads:.3f} | "
            f"{b.time_ratio:.3f} [{q1:.3f}, {q3:.3f}] | {b.over_ideal:.3f} | {b.over_running_ideal:.3f} | "
            f"{b.backbone_images_per_second:.0f} → {b.early_exit_images_per_second:.0f} |"
            + _reference(b.reference_ratio)
        )
    lines += [
        "",
        "| setup | policy | mul-add cost | ideal | ideal + heads | mean-latency ratio | ratio / ideal | backbone p50 / p99 ms | early exit p50 / p99 ms |"
        + extra_head,
        "|---|---|---|---|---|---|---|---|---|" + extra_rule,
    ]
    for row in rows:
        if row.latency is None:
            continue
        l = row.latency
        lines.append(
            f"| {row.setup} | {row.policy} | {l.expected_cost:.3f} | {l.ideal:.3f} | {l.ideal_with_heads:.3f} | "
            f"{l.time_ratio:.3f} | {l.over_ideal:.3f} | {l.backbone_ms['p50']:.2f} / {l.backbone_ms['p99']:.2f} | "
            f"{l.early_exit_ms['p50']:.2f} / {l.early_exit_ms['p99']:.2f} |"
            + _reference(l.reference_ratio)
        )
    return "\n".join(lines)
