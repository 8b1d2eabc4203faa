"""Detectors that read a forward's metadata, indices and outputs (the LSE-merge audit and the
oracle have modules of their own). Each takes a `Forward` and returns its findings.
"""

from __future__ import annotations

import numpy as np

from tensortap.analysis import layout
from tensortap.analysis.findings import POINT_OPS, Finding
from tensortap.analysis.forward import Forward
from tensortap.text import span
from tensortap.format import schema
from tensortap.tolerances import tolerance


def config_mismatch(fw: Forward) -> list[Finding]:
    """The layer's believed dcp_size against the process group's and the cache writer's."""
    seen: dict[tuple, list[int]] = {}
    for rank, meta in fw.metas().items():
        sizes = (meta.get("dcp_size"), meta.get("group_dcp_size"), meta.get("kv_dcp_size"))
        known = {s for s in sizes if s is not None}
        if len(known) > 1:
            seen.setdefault(sizes, []).append(rank)
    findings = []
    for (believed, group, writer), ranks in seen.items():
        findings.append(Finding(
            "config-mismatch", "error",
            f"the layer believes dcp_size={believed}, its process group has {group}, the cache writer {writer}",
            ranks=ranks, evidence={"dcp_size": believed, "group_dcp_size": group, "kv_dcp_size": writer},
            **fw.where()))
    return findings


def no_merge(fw: Forward) -> list[Finding]:
    """A DCP process group of N > 1 whose ranks attend and output only their own heads: nothing merged."""
    findings = []
    for group in fw.dcp_groups():
        if len(group) < 2:
            continue
        unmerged = []
        for rank in group:
            partial = fw.record("partial_out", rank) or fw.record("q", rank)
            merged = fw.record("merged_out", rank)
            if partial is None or merged is None or len(partial.shape) < 2 or len(merged.shape) < 2:
                continue
            if partial.shape[1] == merged.shape[1]:  # attended as many heads as it outputs: no gather, no merge
                unmerged.append(rank)
        if unmerged:
            meta = fw.meta(unmerged[0])
            own = fw.record("merged_out", unmerged[0]).shape[1]
            findings.append(Finding(
                "no-merge", "error",
                f"process group has DCP {len(group)} but ranks {span(unmerged)} merged nothing: each attended its own "
                f"{own} heads, not the group's {own * len(group)} (believed dcp_size={meta.get('dcp_size')})",
                ranks=unmerged, evidence={"group_dcp_size": len(group), "heads_attended": own,
                                          "heads_expected": own * len(group)}, **fw.where()))
    return findings


def query_divergence(fw: Forward) -> list[Finding]:
    """After the all-gather every rank of a DCP group holds the same queries for the same heads.

    Under `dcp_q_replicate` no gather happened: each rank computed the group's queries itself, so
    they must agree within the dtype's tolerance rather than bit for bit."""
    findings = []
    groups = [g for g in fw.dcp_groups() if len(g) > 1]
    if not groups:
        fw.inapplicable("query-divergence", "DCP 1: no query gather")
    for group in groups:
        records = [fw.record("q", r) for r in group]
        records = [rec for rec in records if rec is not None]
        if len(records) < 2:
            fw.skip("query-divergence", "q not captured on two ranks of a DCP group")
            continue
        heads = {rec.rank: (rec.meta.get("head_offset"), rec.shape[1] if len(rec.shape) > 1 else None) for rec in records}
        if len(set(heads.values())) > 1:
            listing = ", ".join(f"rank {r}: heads {o}-{o + n - 1}" if o is not None and n else f"rank {r}: {n} heads"
                                for r, (o, n) in heads.items())
            findings.append(Finding(
                "query-divergence", "error",
                f"ranks {span(sorted(heads))} of one DCP group hold different heads ({listing}): no query all-gather",
                ranks=sorted(heads), evidence={"head_offset_and_count": {str(r): v for r, v in heads.items()}},
                **fw.where()))
            continue
        if not all(rec.stored for rec in records):
            fw.needs_tensors("query-divergence", "q", records[0].rank)
            continue
        replicated = any(rec.meta.get("dcp_q_replicate") for rec in records)
        reference = fw.array("q", records[0].rank, exact=True)
        differing = [rec.rank for rec in records[1:]
                     if fw.array("q", rec.rank, exact=True).shape != reference.shape
                     or not np.array_equal(fw.array("q", rec.rank, exact=True), reference)]
        if replicated:  # computed on every rank: equal within the dtype's tolerance
            base = fw.array("q", records[0].rank)
            differing = [r for r in differing if fw.array("q", r).shape != base.shape
                         or not tolerance(records[0].dtype).allclose(fw.array("q", r), base)]
        if differing:
            base = fw.array("q", records[0].rank)
            diff = max(_max_abs_diff(fw.array("q", r), base) for r in differing)
            how = "computed (dcp_q_replicate)" if replicated else "hold"
            findings.append(Finding(
                "query-divergence", "error",
                f"ranks {span(differing)} {how} different queries than rank {records[0].rank} of their DCP group "
                f"(max abs difference {diff:.3g})",
                ranks=[records[0].rank] + differing, evidence={"max_abs_diff": diff, "dcp_q_replicate": replicated},
                **fw.where()))
    return findings


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b|, inf where exactly one is NaN or shapes differ; equal values (infinities too) give 0."""
    if a.shape != b.shape:
        return float("inf")
    with np.errstate(invalid="ignore"):
        same = (a == b) | (np.isnan(a) & np.isnan(b))  # [...]
        diff = np.where(same, 0.0, np.abs(a - b))  # [...]
    diff = np.where(np.isnan(diff), np.inf, diff)
    return float(diff.max()) if diff.size else 0.0


def _selection(fw: Forward, rank: int):
    """(topk [T, K] global ids, slots [T, K] consumed, meta) of a rank, or None when not captured."""
    topk, slots = fw.array("topk", rank), fw.array("slots", rank)
    if topk is None or slots is None or topk.shape != slots.shape or topk.ndim != 2:
        return None
    return topk, slots, fw.meta(rank)


def _sharding(meta: dict) -> tuple[int, int, int]:
    """(N, rank, I) of the cache's sharding as a record states it: the cache writer's DCP size (else the
    group's), the process group's DCP rank, the cache's interleave."""
    n = int(meta.get("kv_dcp_size") or meta.get("group_dcp_size") or 1)
    return n, int(meta.get("group_dcp_rank") or 0), int(meta.get("interleave") or 1)


def local_len(seq_lens: np.ndarray, n: int, rank: int, interleave: int) -> np.ndarray:
    """Tokens of each request on `rank`: base + clip(L - base*N - r*I, 0, I), base = L // I // N * I."""
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    base = seq_lens // interleave // n * interleave  # [R]
    return base + np.clip(seq_lens - base * n - rank * interleave, 0, interleave)  # [R]


def empty_topk(fw: Forward) -> list[Finding]:
    """Query rows for which a rank consumed no index although it holds some of the selected tokens.

    From full tensors: the rank owns one of the row's selected ids. From stats only (valid ids per
    row): by counting, when more ids were selected than the other ranks hold (V > L - L_r)."""
    bad_ranks, rows_total, evidence = [], 0, {}
    for rank in fw.ranks("slots"):
        found = _selection(fw, rank)
        if found is not None:
            topk, slots, meta = found
            lonely = (slots < 0).all(axis=-1)  # [T]
            if not lonely.any():
                continue
            n, r, interleave = _sharding(meta)
            holds = (topk >= 0) & (layout.owner(np.maximum(topk, 0), n, interleave) == r)  # [T, K]
            bad = lonely & holds.any(axis=-1)  # [T]
            held = holds[bad].sum(-1).tolist()
        else:
            bad, held = _empty_from_stats(fw, rank)
            if bad is None:
                continue
        if bad.any():
            bad_ranks.append(rank)
            rows_total += int(bad.sum())
            evidence[str(rank)] = {"rows": np.flatnonzero(bad).tolist(), "held_tokens": held}
    if not bad_ranks:
        return []
    return [Finding("empty-topk", "error",
                    f"ranks {span(bad_ranks)} consumed no index for {rows_total} query row(s) although they hold "
                    f"selected tokens (lonely q: zero output)", ranks=bad_ranks, evidence=evidence, **fw.where())]


def _empty_from_stats(fw: Forward, rank: int):
    """([T] rows surely lonely by mistake, [n] least selected tokens held) from valid-per-row stats, or (None, None)."""
    consumed, selected = fw.rows_valid("slots", rank), fw.rows_valid("topk", rank)
    meta = fw.meta(rank)
    requests = layout.rows_to_requests(meta, len(consumed)) if consumed is not None else None
    if consumed is None or selected is None or requests is None or len(selected) != len(consumed):
        if fw.record("slots", rank) is not None:
            fw.skip("empty-topk", "needs topk and slots of the rank (tensors or their stats) and req_ids")
        return None, None
    seq_lens = np.asarray(meta.get("seq_lens") or [], dtype=np.int64)
    if len(seq_lens) <= int(requests.max(initial=0)):
        fw.skip("empty-topk", "seq_lens missing for some query rows")
        return None, None
    n, r, interleave = _sharding(meta)
    total = seq_lens[requests]  # [T]
    mine = local_len(seq_lens, n, r, interleave)[requests]  # [T]
    must_hold = selected - (total - mine)  # [T]: > 0 -> at least that many selected ids are on this rank
    bad = (consumed == 0) & (must_hold > 0)  # [T]
    if not bad.any() and (consumed == 0).any():
        fw.skip("empty-topk", "lonely rows in stats only: whether the rank held selected tokens needs the topk tensor")
    return bad, must_hold[bad].tolist()


def topk_out_of_shard(fw: Forward) -> list[Finding]:
    """Consumed slots that are not where this rank's shard keeps the selected tokens."""
    findings = []
    for rank in fw.ranks("slots"):
        found = _selection(fw, rank)
        table = fw.array("block_table", rank)
        if found is None or table is None or table.ndim != 2 or table.shape[1] == 0:
            if all(fw.record(p, rank) is not None for p in ("topk", "slots", "block_table")) and \
                    not all(fw.stored(p, rank) for p in ("topk", "slots", "block_table")):
                fw.needs_tensors("topk-out-of-shard", "topk/slots/block_table", rank)
            else:
                fw.skip("topk-out-of-shard", "topk, slots and block_table not all captured (or not [T, K] / [R, nb])")
            continue
        topk, slots, meta = found
        requests = layout.rows_to_requests(meta, topk.shape[0])
        if requests is None or (len(requests) and requests.max() >= table.shape[0]):
            fw.skip("topk-out-of-shard", "query rows cannot be mapped to requests (record req_ids with the points)")
            continue
        n, r, interleave = _sharding(meta)
        expected = layout.owned_slots(topk, requests, table, int(meta.get("block_size") or 1), n, r, interleave)  # [T, K]
        stray = sum(len(np.setdiff1d(s[s >= 0], e[e >= 0])) for s, e in zip(slots, expected))
        if stray:
            consumed = int((slots >= 0).sum())
            findings.append(Finding(
                "topk-out-of-shard", "error",
                f"rank {rank} consumed {stray} of {consumed} slots that do not hold its share of the selected tokens "
                f"under the cache's sharding (DCP {meta.get('kv_dcp_size')}, interleave {meta.get('interleave')})",
                ranks=[rank], evidence={"stray_slots": stray, "consumed_slots": consumed}, **fw.where()))
    return findings


def lse_nonfinite(fw: Forward) -> list[Finding]:
    """NaN anywhere in an LSE, or +inf where the layer merges (a lonely row that was not neutralised)."""
    findings = []
    for rec in fw.records("lse"):
        stats = rec.stats
        merging = int(rec.meta.get("dcp_size") or 1) > 1
        nan, posinf = int(stats.get("nan", 0) or 0), int(stats.get("posinf", 0) or 0)
        if not (nan or (posinf and merging)):
            continue
        heads: list[int] = []
        if rec.stored:
            lse = fw.array("lse", rec.rank)  # [T, Hq]
            bad = np.isnan(lse) | (np.isposinf(lse) if merging else False)  # [T, Hq]
            if not bad.any():
                continue
            nan, posinf = int(np.isnan(lse).sum()), int(np.isposinf(lse).sum())
            if lse.ndim == 2:
                heads = (np.flatnonzero(bad.any(axis=0)) + int(rec.meta.get("head_offset") or 0)).tolist()
        inf_text = f" and {posinf} +inf" if merging else ""
        findings.append(Finding(
            "lse-nonfinite", "error",
            f"rank {rec.rank}: {nan} NaN{inf_text} LSE value(s) reach the merge" + (f", heads {span(heads)}" if heads else ""),
            ranks=[rec.rank], heads=heads, evidence={"nan": nan, "posinf": posinf}, **fw.where()))
    return findings


def nonfinite(fw: Forward) -> list[Finding]:
    """NaN or Inf in any float tensor (LSEs have their own rules: see lse_nonfinite). Works from stats."""
    findings = []
    for rec in fw.items():
        point, rank = rec.point, rec.rank
        if point in schema.LSE_POINTS or not rec.stats.get("nonfinite"):
            continue
        stats = rec.stats
        findings.append(Finding(
            "nonfinite", "error",
            f"rank {rank} {point}: {stats.get('nan', 0)} NaN, {stats.get('posinf', 0)} +inf, {stats.get('neginf', 0)} -inf",
            ranks=[rank], evidence={"point": point, "nan": stats.get("nan", 0), "posinf": stats.get("posinf", 0),
                                    "neginf": stats.get("neginf", 0)}, op=POINT_OPS.get(point, "kernel"),
            **fw.where()))
    return findings


def zero_heads(fw: Forward) -> list[Finding]:
    """Heads whose attention output is exactly zero although their query selected tokens.

    Attention over at least one token is a convex combination of latents: exactly zero only
    when nothing was attended. Checked per (token, head) on the merged output, or on the
    partial output where merged_out was not captured; a partial counts as having attended
    something only where this rank consumed a slot (under DCP a rank holding none of the
    selected tokens rightly outputs zero). From stats only: norm[t, h] == 0 and valid[t] > 0."""
    point = "merged_out" if fw.ranks("merged_out") else "partial_out"
    zero_by_rank, heads, total = {}, set(), 0
    for rec in fw.records(point):
        selected = _attended_rows(fw, rec.rank, point)  # [T] or None
        if selected is None:
            fw.skip("zero-heads", f"no topk/slots for rank {rec.rank}: which rows attended something is unknown")
            continue
        out = fw.array(point, rec.rank)
        if out is not None:
            if out.ndim != 3:
                continue
            with np.errstate(invalid="ignore"):
                zero = ~np.any(out != 0, axis=-1)  # [T, H]; NaN != 0, so NaN rows are not zero
        else:
            stats = fw.stats_array(point, rec.rank)
            if stats is None or stats.dtype.fields is None or stats.ndim != 2:
                fw.skip("zero-heads", f"{point} of rank {rec.rank} has neither tensor nor head stats")
                continue
            zero = stats["norm"] == 0  # [T, H]
        if zero.shape[0] != selected.shape[0]:
            continue
        zero = zero & selected[:, None]  # [T, H]
        if zero.any():
            offset = int(rec.meta.get("head_offset") or 0)
            rank_heads = (np.flatnonzero(zero.any(axis=0)) + offset).tolist()
            zero_by_rank[rec.rank] = len(rank_heads)
            heads.update(rank_heads)
            total = int(rec.meta.get("num_heads") or 0) or total
    if not zero_by_rank:
        return []
    ranks = sorted(zero_by_rank)
    heads_sorted = sorted(heads)
    of = f"/{total}" if total else ""
    return [Finding("zero-heads", "error",
                    f"ranks {span(ranks)} emit all-zero attention for heads {span(heads_sorted)} "
                    f"({len(heads_sorted)}{of}) although their queries selected tokens",
                    ranks=ranks, heads=heads_sorted, evidence={"zero_heads_per_rank": {str(r): n for r, n in zero_by_rank.items()},
                                                                "num_heads": total, "point": point}, **fw.where())]


def _attended_rows(fw: Forward, rank: int, point: str) -> np.ndarray | None:
    """[T] bool: query rows whose output must not be zero; None when this cannot be told from the dump."""
    if point == "partial_out":
        consumed = fw.rows_valid("slots", rank)
        if consumed is not None:
            return consumed > 0
        if int(fw.meta(rank).get("dcp_size") or 1) > 1:
            return None
    selected = fw.rows_valid("topk", rank)
    return selected > 0 if selected is not None else None


def rank_outlier(fw: Forward) -> list[Finding]:
    """Each rank's share of the row-parallel o_proj sum: zero, or an order of magnitude off the median.

    The size of a share is its norm; from stats only, its absmax (zero iff the norm is zero)."""
    findings = []
    for group in fw.tp_groups():
        norms, measure = {}, "norm"
        for r in group:
            rec = fw.record("o_proj_partial", r)
            if rec is None:
                continue
            a = fw.array("o_proj_partial", r)
            if a is not None:
                with np.errstate(invalid="ignore", over="ignore"):
                    finite = np.where(np.isfinite(a), a, 0.0)  # [T, C]
                    norms[r] = float(np.sqrt(np.square(finite).sum()))  # no BLAS call: no thread start-up
            elif rec.stats.get("absmax") is not None:
                norms[r], measure = float(rec.stats["absmax"]), "absmax"
        if len(norms) < 2:
            if len(group) > 1:
                fw.skip("rank-outlier", "o_proj_partial not captured on two ranks of a TP group")
            else:
                fw.inapplicable("rank-outlier", "TP 1: no all-reduce")
            continue
        total = sum(norms.values())
        shares = {r: (n / total if total else 0.0) for r, n in norms.items()}
        median = float(np.median(list(norms.values())))
        zero = [r for r, n in norms.items() if n == 0.0] if total else []  # all zero: nothing attended anywhere
        far = [r for r, n in norms.items() if n and median and (n > 10 * median or n < median / 10)]
        evidence = {"share": {str(r): round(s, 4) for r, s in shares.items()}, measure: {str(r): n for r, n in norms.items()},
                    "measure": measure}
        listing = ", ".join(f"{shares[r]:.2f}" for r in sorted(shares))
        for ranks, severity, how in ((zero, "error", "exactly zero"), (far, "warning", "an order of magnitude off the median")):
            if ranks:
                findings.append(Finding("rank-outlier", severity, f"ranks {span(ranks)} contribute {how} to the o_proj "
                                        f"all-reduce (shares by {measure} {listing})", ranks=ranks, evidence=evidence,
                                        **fw.where()))
    return findings


def hidden_agreement(fw: Forward) -> tuple[int, int] | None:
    """(ranks whose hidden equals, bit for bit, that of their TP group's first rank; ranks compared).

    `hidden` is the all-reduce's sum or, where the all-reduce is fused with RMSNorm, its
    post-norm output (hidden_kind): either is identical across the TP group. From stats only,
    the exact consensus hash stats["hash"] (with dtype and shape) decides."""
    same = compared = 0
    for group in fw.tp_groups():
        recs = [fw.record("hidden", r) for r in group]
        recs = [rec for rec in recs if rec is not None]
        if len(recs) < 2:
            continue
        if all(rec.stored for rec in recs):
            first = fw.array("hidden", recs[0].rank, exact=True)
            same += sum(1 for rec in recs if np.array_equal(fw.array("hidden", rec.rank, exact=True), first))
        elif all(rec.stats.get("hash") is not None for rec in recs):
            key = lambda rec: (int(rec.stats["hash"]), rec.dtype, rec.shape, rec.meta.get("hidden_kind") or "sum")  # noqa: E731
            same += sum(1 for rec in recs if key(rec) == key(recs[0]))
        else:
            continue
        compared += len(recs)
    return (same, compared) if compared else None
