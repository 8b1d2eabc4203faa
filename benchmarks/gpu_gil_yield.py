"""What the writer's GIL yields save the model's thread, in one table (1 GPU).

    PYTHONPATH=$PWD python benchmarks/gpu_gil_yield.py [--rounds 4] [--per-round 6]

The glm5 reference (bf16, TP1, target + 2 draft passes), eager and CUDA-graph replayed; stats and
full capture of one layer with the writer thread's `yield_gil` (capture/job.py) off, every 100 us
(the CPU pace) and every 20 us (the GPU pace, what the tap uses once it sees a CUDA record), taking
turns in rounds with the untapped step. Ratios are against the untapped step of the same kind.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile

import tensortap
from tensortap.capture import job, runtime
from tensortap.mla.model import ProcessGroups
from tensortap.mla.scenario import DecodeRunner, Scenario

PACES = ("off", "100 us", "20 us")
PACES_NS = {"100 us": 100_000, "20 us": 20_000}
CONFIGS = [("untapped", None), ("stats, layer 78", dict(mode="stats", layers="78")), ("full, layer 78", dict(layers="78"))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--per-round", type=int, default=6)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu_overhead import timed_steps  # host time until the model's stream is done
    from tables import table

    steps = 7 * args.rounds * args.per_round + 8  # the turns share one step count
    base = dict(preset="glm5", ranks=1, dcp=1, dtype="bfloat16", spec_tokens=2, steps=steps)
    groups = ProcessGroups.build(1)
    defaults = job._yield_ns, job.GPU_YIELD_NS
    rows = []
    for kind in ("eager", "graph"):
        runners, taps = {}, {}
        for label, keys in CONFIGS:
            if keys is not None:
                tensortap.configure(dir=tempfile.mkdtemp(prefix="gil-"), **keys)
            runners[label] = DecodeRunner(Scenario(**base, cuda_graph=kind == "graph"), groups, device="cuda:0")
            timed_steps(runners[label], 0, 2)
            taps[label], runtime._tap = runtime._tap, None
        samples, cursor = collections.defaultdict(list), 2
        for _ in range(args.rounds):
            for label, keys in CONFIGS:
                for yields in (PACES if keys is not None else (None,)):
                    job.YIELD = yields != "off"
                    job._yield_ns = job.GPU_YIELD_NS = PACES_NS.get(yields, job.GPU_YIELD_NS)
                    runtime._tap = taps[label]
                    samples[(label, yields)] += timed_steps(runners[label], cursor, args.per_round)
                    cursor += args.per_round
                    if taps[label] is not None:
                        tensortap.flush()  # the writer catches up outside the timed steps
                    runtime._tap = None
        job.YIELD, job._yield_ns, job.GPU_YIELD_NS = True, *defaults
        for tap in taps.values():
            if tap is not None:
                runtime._tap = tap
                tensortap.close()
                runtime._tap = None
        untapped = statistics.median(samples[("untapped", None)])
        for (label, yields), values in samples.items():
            median = statistics.median(values)
            rows.append((kind, label, "-" if label == "untapped" else yields,
                         f"{median * 1e3:.2f}", f"{median / untapped:.3f}"))
    table(f"{args.rounds} rounds x {args.per_round} steps per configuration", ("steps", "TAP", "GIL yield every", "ms",
                                                                             "x untapped"), rows)


if __name__ == "__main__":
    main()
