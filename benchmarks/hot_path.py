"""What the caller pays per tap point on the CPU, as ratios against baselines measured in the same run.

    python benchmarks/hot_path.py [--points 20000]

1. An enabled point() inside a scope (the record is snapshotted and queued), per call with the
   writer idle, with its share of the scope's hand-over at exit, against a bare clone() of the same
   tensor (DESIGN: <= 2x). The clone is timed in the point's place: the same burst of calls right
   after a flush, each clone kept (as a snapshot is, until written). A clone in a hot loop (one
   cache-hot buffer, code and data in cache) is printed too; no tap point runs like that. For
   reference, the per-call time with the writer thread busy (sharing the GIL).
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
    bare clone() in a hot loop, µs per clone in the point's place (the same burst of `per_scope`
    calls right after a flush, each clone kept as a snapshot is until written)."""
    directory = tempfile.mkdtemp(prefix="hot-")
    tensortap.configure(dir=directory, writer="process")
    for _ in range(20):  # warm: the writer process starts, the name caches fill
        with tensortap.scope(**SCOPE):
            for name in NAMES:
                tensortap.point(name, tensor, head_offset=0)
    tensortap.flush()
    own, handover, in_place = [], [], []
    for _ in range(max(1, points // per_scope)):
        tensortap.flush()  # the writer is idle: what is timed is the caller's work alone
        start = time.perf_counter()
        with tensortap.scope(**SCOPE):
            for i in range(per_scope):
                tensortap.point(NAMES[i % len(NAMES)], tensor, head_offset=0)
            inside = time.perf_counter()
        own.append((inside - start) / per_scope)
        handover.append(time.perf_counter() - inside)
        tensortap.flush()  # the baseline in the same place: a clone per call, each kept
        with tensortap.scope(**SCOPE):
            kept = []
            start = time.perf_counter()
            for i in range(per_scope):
                kept.append(tensor.clone())
            in_place.append((time.perf_counter() - start) / per_scope)
            del kept
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
    return (statistics.median(own) * 1e6, statistics.median(handover) * 1e6, loaded * 1e6, clone * 1e6,
            statistics.median(in_place) * 1e6)


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
        own, handover, loaded, clone, in_place = enabled_cost(tensor, args.points)
        per_point = own + handover / 48  # the hand-over at scope exit is the caller's too
        rows.append((label, f"{own:.2f}", f"{handover / 48:.2f}", f"{in_place:.2f}", f"{per_point / in_place:.2f}",
                     f"{clone:.2f}", f"{per_point / clone:.2f}", f"{loaded:.2f}"))
    table("enabled point() in a scope of 21 keys, caller's time per call (target <= 2x clone)",
          ("tensor", "point µs", "+ hand-over µs", "clone in its place µs", "x that clone", "clone, hot loop µs",
           "x hot clone", "with writer busy µs"), rows)
    costs = rejected_costs()
    base = costs["empty function"]
    table("filter-rejected calls (ns per call)", ("call", "ns", "x empty function"),
          [(k, f"{v * 1e9:.0f}", f"{v / base:.2f}") for k, v in costs.items()])


if __name__ == "__main__":
    main()
