"""Capture overhead on one GPU, eager and CUDA-graph-replayed steps, in one table.

    python benchmarks/gpu_overhead.py [--rounds 6] [--per-round 10]

The glm5 reference (bf16, TP1, target + 2 draft passes per step). Every configuration has its own
tap (swapped in for its turn, never closed between turns) and, for graph steps, its own runner whose
graph was captured under that tap; configurations take turns in short rounds so that drift hits all
alike, and the writer catches up between turns (outside the timed steps). Reported: median step time
and its ratio to the untapped step of the same kind. Budgets (DESIGN section 8): eager full one layer
<= 1.10x, eager stats <= 1.03x, graph full one layer <= 1.05x, graph stats <= 1.02x. The synchronous
baseline (`.cpu()` + `torch.save` at every point of one layer) runs eager steps only: a replayed
graph calls no Python at its points.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time

import torch

import tensortap
from tensortap.capture import runtime
from tensortap.mla.model import ProcessGroups
from tensortap.mla.scenario import DecodeRunner, Scenario

LAYER = "78"  # the draft layer: two passes a step


class SyncDumper:
    """The baseline: every point of one layer copied to the host and torch.save'd before the step goes on."""

    def __init__(self, layer: str):
        self.prefix = f"layers.{layer}.attn."
        self.saved = 0

    def point(self, name, tensor, **meta):
        if name.startswith(self.prefix):
            torch.save(tensor.cpu(), io.BytesIO())
            self.saved += 1

    def wants(self, name, **meta):
        return name.startswith(self.prefix)

    @contextlib.contextmanager
    def installed(self):
        saved = {k: getattr(tensortap, k) for k in ("point", "wants", "enabled", "scope")}
        tensortap.point, tensortap.wants = self.point, self.wants
        tensortap.enabled, tensortap.scope = (lambda: True), (lambda **meta: contextlib.nullcontext())
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(tensortap, k, v)


def timed_steps(runner: DecodeRunner, first: int, count: int) -> list[float]:
    """Host time per step until the model's stream is done (as a server waits for its sampled tokens);
    the tap's copies to the host on its side stream are not waited for: that is the design."""
    times = []
    stream = torch.cuda.current_stream()
    for step in range(first, first + count):
        stream.synchronize()
        start = time.perf_counter()
        runner.step(step)
        stream.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="diagnostic: sys.setswitchinterval (seconds) for the whole run")
    args = parser.parse_args()
    if args.switch_interval is not None:
        import sys

        sys.setswitchinterval(args.switch_interval)
    total = args.rounds * args.per_round + 4
    base = dict(preset="glm5", ranks=1, dcp=1, dtype="bfloat16", spec_tokens=2, steps=total + 2)
    groups = ProcessGroups.build(1)
    configs = [("untapped", None), (f"stats, layer {LAYER}", dict(mode="stats", layers=LAYER)),
               (f"full, layer {LAYER}", dict(layers=LAYER)), ("full, all layers", dict()),
               (f"sync .cpu()+torch.save, layer {LAYER}", "sync")]
    eager = DecodeRunner(Scenario(**base), groups, device="cuda:0")
    taps, runners, dumpers = {}, {}, {}
    for label, keys in configs:
        if keys == "sync":
            dumpers[label] = SyncDumper(LAYER)
            continue
        for kind in ("eager", "graph"):
            if keys is not None:
                tensortap.configure(dir=tempfile.mkdtemp(prefix=f"ovh-{kind}-"), **keys)
            if kind == "graph":  # captured under its own tap: the slots belong to it
                runners[(kind, label)] = DecodeRunner(Scenario(**base, cuda_graph=True), groups, device="cuda:0")
                timed_steps(runners[(kind, label)], 0, 2)
            else:
                runners[(kind, label)] = eager
                timed_steps(eager, 0, 2)
            taps[(kind, label)] = runtime._tap
            runtime._tap = None
    samples = {key: [] for key in list(runners) + [("eager", label) for label in dumpers]}
    cursor = {key: 2 for key in samples}
    for _ in range(args.rounds):
        for key in samples:
            kind, label = key
            runtime._tap = taps.get(key)
            with dumpers[label].installed() if label in dumpers else contextlib.nullcontext():
                runner = eager if label in dumpers else runners[key]
                samples[key] += timed_steps(runner, cursor[key], args.per_round)
            cursor[key] += args.per_round
            if runtime._tap is not None:
                tensortap.flush()  # the writer catches up outside the timed steps
            runtime._tap = None
    counters = {}
    for key, tap in taps.items():
        if tap is not None:
            runtime._tap = tap
            tensortap.close()
            counters[key] = tensortap.stats()
    budgets = {("eager", f"full, layer {LAYER}"): 1.10, ("eager", f"stats, layer {LAYER}"): 1.03,
               ("graph", f"full, layer {LAYER}"): 1.05, ("graph", f"stats, layer {LAYER}"): 1.02}
    rows = []
    for label, _ in configs:
        row = [label]
        for kind in ("eager", "graph"):
            values = samples.get((kind, label))
            if not values:
                row += ["-", "-"]
                continue
            med = statistics.median(values)
            ratio = med / statistics.median(samples[(kind, "untapped")])
            budget = budgets.get((kind, label))
            row += [f"{med * 1e3:.2f}", f"{ratio:.3f}" + (f" (<= {budget})" if budget else "")]
        c = [counters.get((k, label)) for k in ("eager", "graph")]
        row.append("/".join(f"{x['records']}r {x['graph_skipped']}s {x['errors']}e {x['dropped']}d" if x else "-"
                            for x in c))
        rows.append(tuple(row))
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}; glm5 bf16 TP1, target + 2 draft passes; "
          f"{args.rounds} rounds x {args.per_round} steps per configuration; GIL switch interval "
          f"{__import__('sys').getswitchinterval() * 1e3:.1f} ms")
    header = ("TAP", "eager ms", "eager x", "graph ms", "graph x", "records/skipped/errors/dropped (eager/graph)")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header] + rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


if __name__ == "__main__":
    main()
