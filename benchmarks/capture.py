"""Capture cost, as ratios against baselines measured in the same run (DESIGN section 8).

    python benchmarks/capture.py [--steps 200] [--repeats 3] [--dir /tmp/bench]

1. Disabled `point()`: ns per call, and the ratio to an empty function called with the
   same arguments (target <= 1.5x), plus the allocated-block count across 1e5 calls (target 0).
2. Capture throughput on realistic decode records (q bf16 [4,64,576], topk int32 [4,2048],
   partial_out fp32 [4,64,512], lse fp32 [4,64], kv_pages uint8 [32,64,656]):
   end-to-end (point() calls until flush() returns) against writing the same bytes with
   numpy.tofile (target >= 0.70x) and against a synchronous per-tensor torch.save dumper
   (target >= 3x), for both writers (writer=process, the default; writer=thread). Also the
   time the caller spends inside point(), which is what a serving process pays on its
   critical path.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import timeit

import torch


def empty(name, tensor, **meta):
    return None


def disabled_cost(number: int = 200_000) -> dict:
    import tensortap

    tensortap.close()
    assert not tensortap.enabled()
    t = torch.zeros(4)
    point = tensortap.point
    glb = {"point": point, "empty": empty, "t": t}
    stmt_tap = "point('layers.78.attn.lse', t, step=3, role='draft')"
    stmt_empty = "empty('layers.78.attn.lse', t, step=3, role='draft')"
    tap = min(timeit.repeat(stmt_tap, globals=glb, number=number, repeat=7)) / number
    base = min(timeit.repeat(stmt_empty, globals=glb, number=number, repeat=7)) / number
    before = sys.getallocatedblocks()
    for _ in range(100_000):
        point("layers.78.attn.lse", t, step=3, role="draft")
    grown = sys.getallocatedblocks() - before
    return {"tap_ns": tap * 1e9, "empty_ns": base * 1e9, "ratio": tap / base, "blocks_grown": grown}


def records():
    torch.manual_seed(0)
    return [
        ("q", torch.randn(4, 64, 576).bfloat16()),
        ("topk", torch.randint(-1, 8192, (4, 2048), dtype=torch.int32)),
        ("partial_out", torch.randn(4, 64, 512)),
        ("lse", torch.randn(4, 64)),
        ("kv_pages", torch.randint(0, 255, (32, 64, 656), dtype=torch.uint8)),
    ]


def run_tofile(directory: str, recs, steps: int) -> float:
    arrays = [(t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy() for _, t in recs]
    path = os.path.join(directory, "tofile.bin")
    start = time.perf_counter()
    with open(path, "wb") as fh:
        for _ in range(steps):
            for a in arrays:
                a.tofile(fh)
    return time.perf_counter() - start


def run_torch_save(directory: str, recs, steps: int) -> float:
    out = os.path.join(directory, "torchsave")
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    for step in range(steps):
        for name, t in recs:
            torch.save({"tensor": t.clone(), "step": step, "layer": 78, "point": name},
                       os.path.join(out, f"step{step}.layer78.{name}.pt"))
    return time.perf_counter() - start


def run_tap(directory: str, recs, steps: int, writer: str = "process") -> tuple[float, float]:
    import tensortap

    tensortap.configure(dir=os.path.join(directory, "tap"), writer=writer)
    inside = 0.0
    start = time.perf_counter()
    for step in range(steps):
        with tensortap.scope(step=step, layer=78, role="draft"):
            for name, t in recs:
                t0 = time.perf_counter()
                tensortap.point(f"layers.78.attn.{name}", t)
                inside += time.perf_counter() - t0
    tensortap.flush()
    total = time.perf_counter() - start
    counters = tensortap.stats()
    tensortap.close()
    written = len(tensortap.open(os.path.join(directory, "tap")))
    if written != steps * len(recs) or counters["lost"] or counters["dropped"]:
        raise SystemExit(f"capture lost records ({written} of {steps * len(recs)} written; {counters}): "
                         "the timing would be meaningless")
    return total, inside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()

    d = disabled_cost()
    print(f"disabled point(): {d['tap_ns']:.1f} ns, empty function: {d['empty_ns']:.1f} ns, "
          f"ratio {d['ratio']:.2f}x (target <= 1.5x); allocated blocks grown over 1e5 calls: {d['blocks_grown']}")

    recs = records()
    per_step = sum(t.numel() * t.element_size() for _, t in recs)
    total_bytes = per_step * args.steps
    results: dict[str, list[float]] = {"tofile": [], "torch.save": [], "tensortap": [], "tensortap (thread)": []}
    inside: dict[str, list[float]] = {"tensortap": [], "tensortap (thread)": []}
    for repeat in range(args.repeats + 1):  # the first round warms the page cache and is not counted
        for label in results:
            directory = tempfile.mkdtemp(dir=args.dir)
            try:
                if label == "tofile":
                    seconds = run_tofile(directory, recs, args.steps)
                elif label == "torch.save":
                    seconds = run_torch_save(directory, recs, args.steps)
                else:
                    writer = "thread" if "thread" in label else "process"
                    seconds, caller = run_tap(directory, recs, args.steps, writer)
                    if repeat:
                        inside[label].append(caller)
                if repeat:
                    results[label].append(seconds)
            finally:
                shutil.rmtree(directory)
    median = {k: statistics.median(v) for k, v in results.items()}
    print(f"\ncapture of {args.steps} steps x 5 records ({per_step / 2**20:.2f} MiB per step, "
          f"{total_bytes / 2**30:.2f} GiB), median of {args.repeats}:")
    print(f"{'writer':<20} {'seconds':>8} {'MB/s':>8}")
    for label, seconds in median.items():
        print(f"{label:<20} {seconds:8.3f} {total_bytes / seconds / 1e6:8.0f}")
    print()
    for label in ("tensortap", "tensortap (thread)"):
        caller = statistics.median(inside[label])
        print(f"{label:<19} throughput: {median['tofile'] / median[label]:.2f}x tofile (target >= 0.70x), "
              f"{median['torch.save'] / median[label]:.2f}x torch.save (target >= 3x); caller pays "
              f"{caller / (5 * args.steps) * 1e6:.1f} us per record, {median['torch.save'] / caller:.1f}x less "
              f"than the synchronous torch.save dumper blocks its caller")


if __name__ == "__main__":
    main()
