"""GPU checks in one run, printed as tables (run on a machine with 4 GPUs; 1 GPU skips the NCCL part).

    python benchmarks/gpu_checks.py [--steps 40]

1. NCCL DCP4: the reference (glm5 sizes, bf16) on 4 GPUs, bug and fixed draft config: all-zero
   heads per rank, whether hidden is bit-identical across ranks, and the verdict of `check`.
2. CUDA graphs: a graph captured with tap points inside replays correctly; the points are skipped.
3. Capture overhead on one GPU: median decode step (target + 2 draft passes, glm5, bf16, TP1)
   with TAP off, stats mode and full capture of one layer and of both (DESIGN: full <= 15%,
   stats <= 3% for one layer).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import torch

import tensortap
from tensortap.distributed import spawn
from tensortap.mla.model import ProcessGroups
from tensortap.mla.scenario import DecodeRunner, Scenario, run_rank


def nccl_rows() -> list[tuple]:
    rows = []
    for fixed in (False, True):
        scn = Scenario(preset="glm5", dtype="bfloat16", fixed=fixed)
        tap = tempfile.mkdtemp(prefix="nccl-")
        start = time.monotonic()
        results = spawn(run_rank, 4, backend="nccl", timeout=400,
                        kwargs=dict(scenario=dataclasses.asdict(scn), collect=True, tap_dir=tap))
        seconds = time.monotonic() - start
        report = tensortap.check(tap)
        for role in ("target", "draft"):
            idx = [i for i, f in enumerate(results[0]) if f["role"] == role]
            zero = [max(int((r[i]["merged"].float().abs().sum(-1) == 0).all(0).sum()) for i in idx) for r in results]
            same = all(torch.equal(results[0][i]["hidden"], r[i]["hidden"]) for i in idx for r in results[1:])
            found = sum(1 for f in report.findings if f.role == role)
            verdict = next((v.name for v in report.verdicts if v.role == role), f"{found} findings" if found else "clean")
            rows.append(("fixed" if fixed else "bug", role, "/".join(map(str, zero)), same, verdict, f"{seconds:.1f}"))
    return rows


def graph_row() -> tuple:
    tap = tempfile.mkdtemp(prefix="graph-")
    tensortap.configure(dir=tap)
    static_in = torch.randn(1024, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(torch.cuda.Stream()):
        _ = static_in * 2
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        static_out = static_in * 3
        tensortap.point("layers.0.attn.hidden", static_out, step=0)
    static_in.fill_(2.0)
    graph.replay()
    torch.cuda.synchronize()
    correct = bool((static_out == 6.0).all())
    counters = tensortap.stats()
    tensortap.close()
    return correct, counters["graph_skipped"], counters["errors"]


def step_times(runner: DecodeRunner, steps: int) -> list[float]:
    times = []
    for step in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        runner.step(step)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def overhead_rows(steps: int) -> list[tuple]:
    scn = Scenario(preset="glm5", ranks=1, dcp=1, dtype="bfloat16", steps=steps, spec_tokens=2)
    runner = DecodeRunner(scn, ProcessGroups.build(1), device="cuda:0")
    modes = [("off", None), ("stats, layer 78", dict(mode="stats", layers="78")),
             ("full, layer 78", dict(layers="78")), ("full, layer 78, writer=thread", dict(layers="78", writer="thread")),
             ("stats, both layers", dict(mode="stats")), ("full, both layers", dict())]
    medians = {}
    step_times(runner, 5)  # warm-up: kernels, allocator
    for _ in range(2):  # two rounds, interleaved, to see the spread
        for label, keys in modes:
            tensortap.close()
            if keys is not None:
                tensortap.configure(dir=tempfile.mkdtemp(prefix="ovh-"), **keys)
                step_times(runner, 3)  # the writer (process) starts
            times = step_times(runner, steps)
            counters = tensortap.stats()
            tensortap.close()
            assert counters["dropped"] == 0 and counters["lost"] == 0 and counters["errors"] == 0, counters
            medians.setdefault(label, []).append(statistics.median(times) * 1e3)
    base = min(medians["off"])
    return [(label, f"{min(v):.2f}", f"{max(v):.2f}", f"{min(v) / base:.3f}") for label, v in medians.items()]


def table(title: str, header: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    for row in [header] + rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    if torch.cuda.device_count() >= 4:
        table("NCCL DCP4 (glm5, bf16, 4 GPUs)", ("draft config", "role", "zero heads/rank", "hidden identical",
                                                  "check", "seconds"), nccl_rows())
    correct, skipped, errors = graph_row()
    table("CUDA graph with tap points inside", ("replay correct", "points skipped", "errors"), [(correct, skipped, errors)])
    table("capture overhead, median decode step (glm5, bf16, 1 GPU; 2 rounds)",
          ("TAP", "ms (best round)", "ms (worst round)", "x off"), overhead_rows(args.steps))


if __name__ == "__main__":
    main()
