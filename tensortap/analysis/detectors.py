"""Detectors that read a forward's metadata, indices and outputs (the LSE-merge audit and the
oracle have modules of their own). Each takes a `Forward` and returns its findings.
"""

from __future__ import annotations

import numpy as np

from tensortap.analysis import layout
from tensortap.analysis.findings import Finding
from tensortap.analysis.forward import Forward
from tensortap.text import span
from tensortap.format import schema


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
    """After the all-gather every rank of a DCP group holds the same queries for the same heads."""
    findings = []
    for group in fw.dcp_groups():
        records = [fw.record("q", r) for r in group]
        records = [rec for rec in records if rec is not None and rec.stored]
        if len(records) < 2:
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
        reference = fw.array("q", records[0].rank, exact=True)
        differing = [rec.rank for rec in records[1:] if not np.array_equal(fw.array("q", rec.rank, exact=True), reference)]
        if differing:
            values = {rec.rank: fw.array("q", rec.rank) for rec in records}
            base = values[records[0].rank]
            diff = max(float(np.nanmax(np.where(np.isnan(values[r]) != np.isnan(base), np.inf, np.abs(values[r] - base))))
                       for r in differing)
            findings.append(Finding(
                "query-divergence", "error",
                f"ranks {span(differing)} hold different queries than rank {records[0].rank} of their DCP group "
                f"(max abs difference {diff:.3g})",
                ranks=[records[0].rank] + differing, evidence={"max_abs_diff": diff}, **fw.where()))
    return findings


def _selection(fw: Forward, rank: int):
    """(topk [T, K] global ids, slots [T, K] consumed, meta) of a rank, or None when not captured."""
    topk, slots = fw.array("topk", rank), fw.array("slots", rank)
    if topk is None or slots is None or topk.shape != slots.shape:
        return None
    return topk, slots, fw.meta(rank)


def empty_topk(fw: Forward) -> list[Finding]:
    """Query rows for which a rank consumed no index although it holds some of the selected tokens."""
    bad_ranks, rows_total, evidence = [], 0, {}
    for rank in fw.ranks("slots"):
        found = _selection(fw, rank)
        if found is None:
            continue
        topk, slots, meta = found
        lonely = (slots < 0).all(axis=-1)  # [T]
        if not lonely.any():
            continue
        n, interleave = int(meta.get("kv_dcp_size") or 1), int(meta.get("interleave") or 1)
        holds = ((topk >= 0) & (layout.owner(np.maximum(topk, 0), n, interleave) == int(meta.get("group_dcp_rank") or 0)))
        bad = lonely & holds.any(axis=-1)  # [T]
        if bad.any():
            bad_ranks.append(rank)
            rows_total += int(bad.sum())
            evidence[str(rank)] = {"rows": np.flatnonzero(bad).tolist(), "held_tokens": holds[bad].sum(-1).tolist()}
    if not bad_ranks:
        return []
    return [Finding("empty-topk", "error",
                    f"ranks {span(bad_ranks)} consumed no index for {rows_total} query row(s) although they hold "
                    f"selected tokens (lonely q: zero output)", ranks=bad_ranks, evidence=evidence, **fw.where())]


def topk_out_of_shard(fw: Forward) -> list[Finding]:
    """Consumed slots that are not where this rank's shard keeps the selected tokens."""
    findings = []
    for rank in fw.ranks("slots"):
        found = _selection(fw, rank)
        table = fw.array("block_table", rank)
        if found is None or table is None:
            continue
        topk, slots, meta = found
        requests = layout.rows_to_requests(meta, topk.shape[0])
        if requests is None:
            findings.append(Finding("topk-out-of-shard", "info",
                                    f"rank {rank}: not checked: {topk.shape[0]} query rows and no req_ids to map "
                                    f"them to requests (record req_ids with the points)", ranks=[rank], **fw.where()))
            continue
        expected = layout.owned_slots(topk, requests, table, int(meta.get("block_size")), int(meta.get("kv_dcp_size") or 1),
                                      int(meta.get("group_dcp_rank") or 0), int(meta.get("interleave") or 1))  # [T, K]
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
        if not rec.stored or not (stats.get("nan") or stats.get("posinf")):
            continue
        lse = fw.array("lse", rec.rank)  # [T, Hq]
        merging = int(rec.meta.get("dcp_size") or 1) > 1
        bad = np.isnan(lse) | (np.isposinf(lse) if merging else False)
        if bad.any():
            offset = int(rec.meta.get("head_offset") or 0)
            heads = (np.flatnonzero(bad.any(axis=0)) + offset).tolist()
            findings.append(Finding(
                "lse-nonfinite", "error",
                f"rank {rec.rank}: {int(np.isnan(lse).sum())} NaN and {int(np.isposinf(lse).sum())} +inf LSE value(s) "
                f"reach the merge, heads {span(heads)}",
                ranks=[rec.rank], heads=heads, evidence={"nan": int(np.isnan(lse).sum()),
                                                         "posinf": int(np.isposinf(lse).sum())}, **fw.where()))
    return findings


def nonfinite(fw: Forward) -> list[Finding]:
    """NaN or Inf in any float tensor (LSEs have their own rules: see lse_nonfinite)."""
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
                                    "neginf": stats.get("neginf", 0)}, **fw.where()))
    return findings


def zero_heads(fw: Forward) -> list[Finding]:
    """Heads whose attention output is exactly zero although their query selected tokens.

    Attention over at least one token is a convex combination of latents: exactly zero only
    when nothing was attended. Checked per (token, head) on the merged output, or on the
    partial output where merged_out was not captured; a partial counts as having attended
    something only where this rank consumed a slot (under DCP a rank holding none of the
    selected tokens rightly outputs zero)."""
    point = "merged_out" if fw.ranks("merged_out") else "partial_out"
    zero_by_rank, heads, total = {}, set(), 0
    for rec in fw.records(point):
        out = fw.array(point, rec.rank)
        selected = _attended_rows(fw, rec.rank, point)  # [T] or None
        if out is None or out.ndim != 3 or selected is None:
            continue
        zero = ~np.any(out != 0, axis=-1) & selected[:, None]  # [T, H]
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
        slots = fw.array("slots", rank)
        if slots is not None:
            return (slots >= 0).any(axis=-1)
        if int(fw.meta(rank).get("dcp_size") or 1) > 1:
            return None
    topk = fw.array("topk", rank)
    return (topk >= 0).any(axis=-1) if topk is not None else None


def rank_outlier(fw: Forward) -> list[Finding]:
    """Each rank's share of the row-parallel o_proj sum: zero, or an order of magnitude off the median."""
    findings = []
    for group in fw.tp_groups():
        norms = {r: float(np.linalg.norm(a)) for r in group if (a := fw.array("o_proj_partial", r)) is not None}
        if len(norms) < 2:
            continue
        total = sum(norms.values())
        shares = {r: (n / total if total else 0.0) for r, n in norms.items()}
        median = float(np.median(list(norms.values())))
        zero = [r for r, n in norms.items() if n == 0.0]
        far = [r for r, n in norms.items() if n and median and (n > 10 * median or n < median / 10)]
        evidence = {"share": {str(r): round(s, 4) for r, s in shares.items()}, "norm": {str(r): n for r, n in norms.items()}}
        listing = ", ".join(f"{shares[r]:.2f}" for r in sorted(shares))
        for ranks, severity, how in ((zero, "error", "exactly zero"), (far, "warning", "an order of magnitude off the median")):
            if ranks:
                findings.append(Finding("rank-outlier", severity, f"ranks {span(ranks)} contribute {how} to the o_proj "
                                        f"all-reduce (shares {listing})", ranks=ranks, evidence=evidence, **fw.where()))
    return findings


def hidden_agreement(fw: Forward) -> tuple[int, int] | None:
    """(ranks whose hidden equals, bit for bit, that of their TP group's first rank; ranks compared)."""
    same = compared = 0
    for group in fw.tp_groups():
        ranks = [r for r in group if fw.record("hidden", r) is not None and fw.record("hidden", r).stored]
        if len(ranks) < 2:
            continue
        first = fw.array("hidden", ranks[0], exact=True)
        same += sum(1 for r in ranks if np.array_equal(fw.array("hidden", r, exact=True), first))
        compared += len(ranks)
    return (same, compared) if compared else None
