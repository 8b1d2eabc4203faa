"""GPU checks in one run, printed as tables (run on a machine with 4 GPUs; 1 GPU skips the NCCL part).

    python benchmarks/gpu_checks.py [--steps 40]

1. NCCL DCP4: the reference (glm5 sizes, bf16) on 4 GPUs, bug and fixed draft config: all-zero
   heads per rank, whether hidden is bit-identical across ranks, and the verdict of `check`.
2. CUDA graphs: a graph captured with a tap point inside replays correctly and records the replay.
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
from tables import table
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
    """A graph captured with a tap point inside: the replay is correct and records the replayed values."""
    tap = tempfile.mkdtemp(prefix="graph-")
    tensortap.configure(dir=tap)
    static_in = torch.randn(1024, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(torch.cuda.Stream()):
        _ = static_in * 2
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        static_out = static_in * 3
        tensortap.point("layers.0.attn.hidden", static_out)
    static_in.fill_(2.0)
    with tensortap.scope(step=5):
        graph.replay()
    torch.cuda.synchronize()
    correct = bool((static_out == 6.0).all())
    tensortap.close()
    counters = tensortap.stats()
    d = tensortap.open(tap)
    recorded = len(d) == 1 and d.steps == [5] and bool((d.get("hidden") == 6.0).all())
    return correct, recorded, counters["graph_skipped"], counters["errors"]


def step_times(runner: DecodeRunner, steps: int) -> list[float]:
    times = []
    for step in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        runner.step(step)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def overhead_rows(steps: int, rounds: int = 8) -> list[tuple]:
    """Median step time per TAP mode; modes take turns in short rounds so that drift hits all alike."""
    scn = Scenario(preset="glm5", ranks=1, dcp=1, dtype="bfloat16", steps=steps, spec_tokens=2)
    runner = DecodeRunner(scn, ProcessGroups.build(1), device="cuda:0")
    modes = [("off", None), ("stats, layer 78", dict(mode="stats", layers="78")),
             ("full, layer 78", dict(layers="78")), ("full, layer 78, writer=thread", dict(layers="78", writer="thread")),
             ("stats, both layers", dict(mode="stats")), ("full, both layers", dict())]
    taps = {}
    for label, keys in modes:  # one tap per mode, kept across rounds (the writer starts once)
        if keys is not None:
            tensortap.configure(dir=tempfile.mkdtemp(prefix="ovh-"), **keys)
            step_times(runner, 3)
            taps[label] = tensortap_state()
            tensortap_state(None)
    step_times(runner, 5)  # warm-up without a tap
    samples: dict[str, list[float]] = {label: [] for label, _ in modes}
    per_round = max(1, steps // rounds)
    for _ in range(rounds):
        for label, _keys in modes:
            tensortap_state(taps.get(label))
            samples[label] += step_times(runner, per_round)
            tensortap.flush()  # the writer catches up here, outside the timed steps of the next mode
            tensortap_state(None)
    for tap in taps.values():
        tensortap_state(tap)
        assert tensortap.stats()["dropped"] == 0 and tensortap.stats()["lost"] == 0, tensortap.stats()
        tensortap.close()
    base = statistics.median(samples["off"])
    rows = []
    for label, values in samples.items():
        q1, q3 = statistics.quantiles(values, n=4)[0], statistics.quantiles(values, n=4)[2]
        rows.append((label, f"{statistics.median(values) * 1e3:.2f}", f"{q1 * 1e3:.2f}-{q3 * 1e3:.2f}",
                     f"{statistics.median(values) / base:.3f}"))
    return rows


def tensortap_state(tap="keep"):
    """Swap the active tap in and out without closing it (benchmark only)."""
    from tensortap.capture import runtime

    if tap == "keep":
        return runtime._tap
    runtime._tap = tap
    return tap


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=80, help="steps per mode, over all rounds")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    if torch.cuda.device_count() >= 4:
        table("NCCL DCP4 (glm5, bf16, 4 GPUs)", ("draft config", "role", "zero heads/rank", "hidden identical",
                                                  "check", "seconds"), nccl_rows())
    table("CUDA graph with a tap point inside", ("replay correct", "replayed value recorded", "points skipped", "errors"),
          [graph_row()])
    table("capture overhead per decode step (glm5, bf16, 1 GPU; modes interleaved in rounds)",
          ("TAP", "median ms", "IQR ms", "x off"), overhead_rows(args.steps))


if __name__ == "__main__":
    main()
