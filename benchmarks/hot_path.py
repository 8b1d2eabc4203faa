"""What the caller pays per tap point on the CPU, as ratios against baselines measured in the same run.

    python benchmarks/hot_path.py [--points 20000]

1. An enabled point() inside a scope (the record is snapshotted and queued), per call with the
   writer idle, against a bare clone() of the same tensor (DESIGN: <= 2x); the scope's hand-over
   at exit; and the per-call time with the writer thread busy (sharing the GIL) for reference.
   For reference too, a clone per call when a scope's clones are all kept (as snapshots are, until
   written): a bare clone() in a loop reuses one cache-hot buffer, a snapshot cannot.
2. A point the filter rejects by its name (layer/point, cached per name), a point inside a scope the
   filter rejects (step, decided once per scope), a rejected scope's enter/exit, and wants() on a
   rejected name: ns per call against an empty Python function with the same arguments.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import timeit

import torch

import tensortap
from tables import table

SCOPE = dict(step=3, role="draft", spec_pos=0, tp_rank=0, tp_size=4, dcp_rank=0, dcp_size=4, group_dcp_rank=0,
             group_dcp_size=4, kv_dcp_size=4, interleave=1, num_heads=64, seq_lens=[4101, 3001],
             local_seq_lens=[1026, 751], req_ids=[0, 1], kv_format="fp8_ds_mla", block_size=64,
             softmax_scale=0.07, kv_lora_rank=512, rope_dim=64)
NAMES = [f"layers.78.attn.{p}" for p in ("q", "partial_out", "lse", "merged_out", "attn_out", "hidden")]


def empty(name, tensor, **meta):
    return None


def enabled_cost(tensor: torch.Tensor, points: int, per_scope: int = 48) -> tuple[float, ...]:
    """µs per enabled point() inside a scope with the writer idle (the caller's own work), µs per
    scope hand-over, µs per point end to end with the writer running (GIL shared with it), µs per
    bare clone(), µs per clone when a scope's `per_scope` clones are kept."""
    directory = tempfile.mkdtemp(prefix="hot-")
    tensortap.configure(dir=directory, writer="process")
    for _ in range(20):  # warm: the writer process starts, the name caches fill
        with tensortap.scope(**SCOPE):
            tensortap.point(NAMES[0], tensor)
    tensortap.flush()
    own, handover = [], []
    for _ in range(max(1, points // per_scope)):
        tensortap.flush()  # the writer is idle: what is timed is the caller's work alone
        start = time.perf_counter()
        with tensortap.scope(**SCOPE):
            for i in range(per_scope):
                tensortap.point(NAMES[i % len(NAMES)], tensor, head_offset=0)
            inside = time.perf_counter()
        own.append((inside - start) / per_scope)
        handover.append(time.perf_counter() - inside)
    start = time.perf_counter()
    rounds = max(1, points // 8)
    for _ in range(rounds):
        with tensortap.scope(**SCOPE):
            for i in range(8):
                tensortap.point(NAMES[i % len(NAMES)], tensor, head_offset=0)
    loaded = (time.perf_counter() - start) / (rounds * 8)
    tensortap.close()
    shutil.rmtree(directory, ignore_errors=True)  # GBs of dump: each run would leave it behind
    clone = min(timeit.repeat(lambda: tensor.clone(), number=points, repeat=5)) / points
    held = []
    for _ in range(max(1, points // per_scope)):
        start = time.perf_counter()
        kept = [tensor.clone() for _ in range(per_scope)]
        held.append((time.perf_counter() - start) / per_scope)
        del kept
    return (statistics.median(own) * 1e6, statistics.median(handover) * 1e6, loaded * 1e6, clone * 1e6,
            statistics.median(held) * 1e6)


def rejected_costs(number: int = 100_000) -> dict:
    directory = tempfile.mkdtemp(prefix="hot-")
    tensortap.configure(dir=directory, layers="0", steps="100-140")
    t = torch.zeros(4)
    point, scope, wants = tensortap.point, tensortap.scope, tensortap.wants
    glb = {"point": point, "empty": empty, "t": t, "scope": scope, "wants": wants, "SCOPE": SCOPE}
    with scope(step=120, role="draft"):  # a kept scope: the point's name (layer 78) is rejected
        by_name = min(timeit.repeat("point('layers.78.attn.lse', t, head_offset=0)", globals=glb,
                                    number=number, repeat=5)) / number
    with scope(step=3, role="draft"):  # a rejected scope: its points cost its one verdict
        by_scope = min(timeit.repeat("point('layers.0.attn.lse', t, head_offset=0)", globals=glb,
                                     number=number, repeat=5)) / number
        want = min(timeit.repeat("wants('layers.78.attn.kv_pages')", globals=glb, number=number, repeat=5)) / number
    scope_cost = min(timeit.repeat("with scope(**SCOPE): pass", globals=glb, number=number // 10, repeat=5)) / (number // 10)
    base = min(timeit.repeat("empty('layers.78.attn.lse', t, head_offset=0)", globals=glb, number=number,
                             repeat=5)) / number
    counters = tensortap.stats()
    tensortap.close()
    shutil.rmtree(directory, ignore_errors=True)
    assert counters["records"] == 0 and counters["errors"] == 0, counters
    return {"empty function": base, "point, name rejected": by_name, "point, scope rejected": by_scope,
            "wants, name rejected": want, "scope enter+exit (21 keys), rejected": scope_cost}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=20_000)
    args = parser.parse_args()
    rows = []
    for label, tensor in (("lse fp32 [4, 64]", torch.randn(4, 64)),
                          ("merged_out bf16 [4, 64, 512]", torch.randn(4, 64, 512).bfloat16()),
                          ("hidden fp32 [4, 6144]", torch.randn(4, 6144))):
        own, handover, loaded, clone, held = enabled_cost(tensor, args.points)
        rows.append((label, f"{own:.2f}", f"{clone:.2f}", f"{own / clone:.2f}", f"{handover:.1f}", f"{loaded:.2f}",
                     f"{held:.2f}"))
    table("enabled point() in a scope of 21 keys, caller's time per call (target <= 2x clone)",
          ("tensor", "point µs", "clone µs", "x clone", "hand-over µs/scope", "with writer busy µs",
           "clone, 48 kept µs"), rows)
    costs = rejected_costs()
    base = costs["empty function"]
    table("filter-rejected calls (ns per call)", ("call", "ns", "x empty function"),
          [(k, f"{v * 1e9:.0f}", f"{v / base:.2f}") for k, v in costs.items()])


if __name__ == "__main__":
    main()
