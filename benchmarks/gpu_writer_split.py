"""Which part of the tap's GPU overhead is the caller's, and which the writer's, in one table.

    PYTHONPATH=$PWD python benchmarks/gpu_writer_split.py [--rounds 4] [--per-round 8]

The glm5 reference (bf16, TP1, target + 2 draft passes), eager and CUDA-graph replayed. Each mode
runs twice: as it is, and with the tap's hand-over to the writer replaced by a no-op ("caller
only": the records' copies and stats are made and then dropped, so no writer thread runs). The
difference is what the writer's thread costs the model's thread (its GIL, its cores). Also printed:
the writer thread's CPU per record (time.thread_time around each batch it writes).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time

import torch

import tensortap
from tensortap.capture import runtime
from tensortap.capture import writer as writer_module
from tensortap.capture.job import Job, record_count
from tensortap.capture.staging import Stager
from tensortap.mla.model import ProcessGroups
from tensortap.mla.scenario import DecodeRunner, Scenario

CONFIGS = [("untapped", None, False), ("stats, layer 78", dict(mode="stats", layers="78"), False),
           ("full, layer 78", dict(layers="78"), False), ("stats, layer 78, caller only", dict(mode="stats", layers="78"), True),
           ("full, layer 78, caller only", dict(layers="78"), True)]
writer_cpu: dict = collections.defaultdict(float)
writer_records: collections.Counter = collections.Counter()


def timed_writer_batches() -> None:
    """Count the writer thread's CPU per batch, by the label its Writer is given below."""
    original = writer_module.Writer._write_batch

    def write_batch(self, jobs):
        start = time.thread_time()
        original(self, jobs)
        label = getattr(self, "benchmark_label", None)
        writer_cpu[label] += time.thread_time() - start
        writer_records[label] += record_count(jobs)  # a graph replay's Replay holds one record per slot

    writer_module.Writer._write_batch = write_batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--per-round", type=int, default=8)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu_overhead import timed_steps  # the same timing: host time until the model's stream is done

    timed_writer_batches()
    steps = len(CONFIGS) * args.rounds * args.per_round + 8  # the configurations take turns on one step count
    base = dict(preset="glm5", ranks=1, dcp=1, dtype="bfloat16", spec_tokens=2, steps=steps)
    groups = ProcessGroups.build(1)
    rows = []
    for kind in ("graph", "eager"):
        runners, taps = {}, {}
        for label, keys, caller_only in CONFIGS:
            if keys is not None:
                tensortap.configure(dir=tempfile.mkdtemp(prefix="split-"), **keys)
            runner = DecodeRunner(Scenario(**base, cuda_graph=kind == "graph"), groups, device="cuda:0")
            timed_steps(runner, 0, 2)
            tap = runtime._tap
            if tap is not None and caller_only:
                tap._submit_now = lambda jobs: Stager.mark_ready(  # then dropped (a Replay has its event)
                    [job.staged for job in jobs if isinstance(job, Job)])
            elif tap is not None and tap.writer is not None:
                tap.writer.benchmark_label = (kind, label)
            runners[label], taps[label] = runner, tap
            runtime._tap = None
        samples, cursor = collections.defaultdict(list), 2
        for _ in range(args.rounds):
            for label, _, caller_only in CONFIGS:
                runtime._tap = taps[label]
                samples[label] += timed_steps(runners[label], cursor, args.per_round)
                cursor += args.per_round
                if taps[label] is not None and not caller_only:
                    tensortap.flush()  # the writer catches up outside the timed steps
                runtime._tap = None
        for label, tap in taps.items():
            if tap is not None:
                runtime._tap = tap
                tensortap.close()
                runtime._tap = None
        untapped = statistics.median(samples["untapped"])
        for label, _, _ in CONFIGS:
            median = statistics.median(samples[label])
            count = writer_records.get((kind, label))
            cpu = f"{writer_cpu[(kind, label)] / count * 1e6:.0f}" if count else "-"
            rows.append((kind, label, f"{median * 1e3:.2f}", f"{median / untapped:.3f}", cpu))
    header = ("steps", "TAP", "ms", "x untapped", "writer CPU us/record")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}; glm5 bf16 TP1, target + 2 draft passes; "
          f"{args.rounds} rounds x {args.per_round} steps")
    for row in [header] + rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


if __name__ == "__main__":
    main()
