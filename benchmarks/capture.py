"""Capture cost, as ratios against baselines measured in the same run (DESIGN section 8).

    python benchmarks/capture.py [--steps 200] [--repeats 3] [--small 4000] [--dir /tmp/bench]
                                 [--writers process,thread] [--checksum]

1. Disabled `point()`: ns per call, and the ratio to an empty function called with the
   same arguments (target <= 1.5x), plus the allocated-block count across 1e5 calls (target 0).
2. Capture throughput on realistic decode records (q bf16 [4,64,576], topk int32 [4,2048],
   partial_out fp32 [4,64,512], lse fp32 [4,64], kv_pages uint8 [32,64,656]), one scope per
   step: end-to-end (point() calls until flush() returns) against writing the same bytes with
   numpy.tofile (target >= 0.70x) and against a synchronous per-tensor torch.save dumper
   (target >= 3x), for both writers (writer=process, the default; writer=thread). Also the
   time the caller spends inside point() (what a serving process pays on its critical path),
   the CPU the server's writer thread spends per record (it competes with the model for the
   GIL), and with writer=process the writer process's CPU per record.
3. Small records: `--small` records of 256 B (lse fp32 [1, 64]) in scopes of 5, records per
   second until flush() returns, with the same CPU figures.

4. With --checksum: capture throughput with checksum=on against off, for each writer.

CPU times are read from /proc (schedstat) just before close(): they do not depend on how busy
the other cores are, where the wall-clock ratios do (run it on a quiet machine).
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


def _cpu_ns(path: str) -> int:
    """CPU time so far of a thread or process, from its /proc schedstat (0 where there is none)."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _writer_cpu() -> tuple[int, int]:
    """(CPU ns of this process's tensortap writer thread, CPU ns of its writer process, if any)."""
    import threading

    from tensortap.capture import runtime

    thread = next((t for t in threading.enumerate() if t.name == "tensortap-writer"), None)
    own = _cpu_ns(f"/proc/self/task/{thread.native_id}/schedstat") if thread is not None else 0
    tap = runtime._tap
    sink = tap.writer.sink if tap is not None and tap.writer is not None else None
    process = getattr(sink, "process", None)
    child = _cpu_ns(f"/proc/{process.pid}/schedstat") if process is not None else 0
    return own, child


def run_tap(directory: str, recs, steps: int, writer: str = "process", **keys) -> dict:
    """One capture of `steps` scopes of `recs`: wall seconds, caller seconds, writer CPU seconds."""
    import tensortap

    tensortap.configure(dir=os.path.join(directory, "tap"), writer=writer, **keys)
    with tensortap.scope(step=-1, layer=78, role="draft"):  # start the writer before the clock
        tensortap.point("layers.78.attn.lse", torch.zeros(1))
    tensortap.flush()
    own0, child0 = _writer_cpu()
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
    own1, child1 = _writer_cpu()
    counters = tensortap.stats()
    tensortap.close()
    expected = steps * len(recs) + 1
    written = len(tensortap.open(os.path.join(directory, "tap")))
    if written != expected or counters["lost"] or counters["dropped"]:
        raise SystemExit(f"capture lost records ({written} of {expected} written; {counters}): "
                         "the timing would be meaningless")
    return {"seconds": total, "caller": inside, "thread_cpu": (own1 - own0) / 1e9, "child_cpu": (child1 - child0) / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", type=int, default=4000, help="256-byte records for the small-record run")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--writers", default="process,thread")
    parser.add_argument("--checksum", action="store_true", help="also measure the cost of checksum=on")
    args = parser.parse_args()
    writers = [w.strip() for w in args.writers.split(",") if w.strip()]

    d = disabled_cost()
    print(f"disabled point(): {d['tap_ns']:.1f} ns, empty function: {d['empty_ns']:.1f} ns, "
          f"ratio {d['ratio']:.2f}x (target <= 1.5x); allocated blocks grown over 1e5 calls: {d['blocks_grown']}")

    recs = records()
    per_step = sum(t.numel() * t.element_size() for _, t in recs)
    total_bytes = per_step * args.steps
    labels = ["tofile", "torch.save"] + [f"tensortap ({w})" for w in writers]
    seconds: dict[str, list[float]] = {k: [] for k in labels}
    tap: dict[str, list[dict]] = {f"tensortap ({w})": [] for w in writers}
    for repeat in range(args.repeats + 1):  # the first round warms the page cache and is not counted
        for label in labels:
            directory = tempfile.mkdtemp(dir=args.dir)
            try:
                if label == "tofile":
                    took = run_tofile(directory, recs, args.steps)
                elif label == "torch.save":
                    took = run_torch_save(directory, recs, args.steps)
                else:
                    result = run_tap(directory, recs, args.steps, label.split("(")[1].rstrip(")"))
                    took = result["seconds"]
                    if repeat:
                        tap[label].append(result)
                if repeat:
                    seconds[label].append(took)
            finally:
                shutil.rmtree(directory)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    n_records = 5 * args.steps
    print(f"\ncapture of {args.steps} steps x 5 records ({per_step / 2**20:.2f} MiB per step, "
          f"{total_bytes / 2**30:.2f} GiB), median of {args.repeats}:")
    print(f"{'writer':<22} {'seconds':>8} {'GB/s':>6} {'x tofile':>9} {'x torch.save':>13} {'caller us/rec':>14} "
          f"{'thread CPU us/rec':>18} {'process CPU us/rec':>19}")
    for label in labels:
        line = f"{label:<22} {median[label]:8.3f} {total_bytes / median[label] / 1e9:6.2f}"
        if label in tap:
            pick = lambda key: statistics.median(r[key] for r in tap[label]) / n_records * 1e6  # noqa: E731
            line += (f" {median['tofile'] / median[label]:9.2f} {median['torch.save'] / median[label]:13.2f} "
                     f"{pick('caller'):14.1f} {pick('thread_cpu'):18.1f} {pick('child_cpu'):19.1f}")
        print(line)
    print("targets: >= 0.70x tofile and >= 3x torch.save, for each writer")

    if args.checksum:
        print(f"\nchecksum=on against off ({args.steps} steps x 5 records), median of {args.repeats}:")
        for writer in writers:
            took = {"off": [], "on": []}
            for repeat in range(args.repeats):
                for switch in ("off", "on"):
                    directory = tempfile.mkdtemp(dir=args.dir)
                    try:
                        took[switch].append(run_tap(directory, recs, args.steps, writer, checksum=switch)["seconds"])
                    finally:
                        shutil.rmtree(directory)
            off, on = statistics.median(took["off"]), statistics.median(took["on"])
            print(f"tensortap ({writer}): {total_bytes / off / 1e9:.2f} GB/s off, {total_bytes / on / 1e9:.2f} GB/s on: "
                  f"checksum costs {(on - off) / off * 100:.0f}% of capture throughput (default on below 5%)")

    if args.small:
        small = [("lse", torch.randn(1, 64))] * 5  # 256 B each, five per scope
        steps = max(1, args.small // 5)
        print(f"\nsmall records: {steps * 5} records of 256 B in scopes of 5, median of {args.repeats}:")
        print(f"{'writer':<22} {'records/s':>10} {'caller us/rec':>14} {'thread CPU us/rec':>18} "
              f"{'process CPU us/rec':>19}")
        for writer in writers:
            runs = []
            for repeat in range(args.repeats):
                directory = tempfile.mkdtemp(dir=args.dir)
                try:
                    runs.append(run_tap(directory, small, steps, writer))
                finally:
                    shutil.rmtree(directory)
            pick = lambda key: statistics.median(r[key] for r in runs) / (steps * 5)  # noqa: E731
            print(f"{'tensortap (' + writer + ')':<22} {1 / pick('seconds'):10.0f} {pick('caller') * 1e6:14.1f} "
                  f"{pick('thread_cpu') * 1e6:18.1f} {pick('child_cpu') * 1e6:19.1f}")


if __name__ == "__main__":
    main()
