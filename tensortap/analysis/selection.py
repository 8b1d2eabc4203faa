"""Selection sanity across a DCP group: one top-k for the whole group, and no shard masked away.

topk-divergence: after the indexer's all-gather every rank of a DCP group holds the same global
    top-k per query row (a set; the order may differ). Per row, the reference is the set most
    ranks hold (ties: the lowest rank's); a rank differs by |S_r \\ S_ref| ids. From stats only,
    differing valid-id counts per row already tell.
shard-masked: a rank's LSE is -inf (its merge weight exp(lse_r - lse_g) is 0) on a row for which
    it consumed valid slots: the tokens it holds are masked out of the merge (a padding mask, or a
    local length of 0, applied to a real row). Values at or below -1e20 count as -inf (mask constants).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from tensortap.analysis.findings import Finding
from tensortap.analysis.forward import Forward
from tensortap.analysis.merge_audit import natural_lse
from tensortap.text import span

MASKED = -1e20


def topk_divergence(fw: Forward) -> list[Finding]:
    code = "topk-divergence"
    findings = []
    groups = [g for g in fw.dcp_groups() if len(g) > 1]
    if not groups:
        fw.inapplicable(code, "DCP 1: one rank selects")
    for group in groups:
        ranks = [r for r in group if fw.record("topk", r) is not None]
        if len(ranks) < 2:
            fw.skip(code, "topk not captured on two ranks of a DCP group")
            continue
        arrays = {r: fw.array("topk", r) for r in ranks}
        if any(a is None for a in arrays.values()):
            found = _from_stats(fw, ranks)
            if found is not None:
                findings.append(found)
            continue
        if len({a.shape[0] for a in arrays.values()}) > 1 or any(a.ndim != 2 for a in arrays.values()):
            findings.append(Finding(code, "error", f"ranks {span(ranks)} of one DCP group hold top-k selections of "
                                    f"different shapes ({', '.join(str(list(a.shape)) for a in arrays.values())})",
                                    ranks=ranks, evidence={"shapes": {str(r): list(a.shape) for r, a in arrays.items()}},
                                    **fw.where()))
            continue
        first = arrays[ranks[0]]
        if all(np.array_equal(a, first) for a in arrays.values()):
            continue  # the common case: one selection, bit for bit
        differ: dict[int, list] = {}
        for t in range(arrays[ranks[0]].shape[0]):
            sets = {r: frozenset(a[t][a[t] >= 0].tolist()) for r, a in arrays.items()}
            counts = Counter(sets.values())
            best = max(counts.values())
            reference = next(sets[r] for r in ranks if counts[sets[r]] == best)
            for r in ranks:
                if sets[r] != reference:
                    differ.setdefault(r, []).append((t, len(sets[r] - reference), len(reference - sets[r])))
        if not differ:
            continue
        bad = sorted(differ)
        worst = {str(r): max(n for _, n, _ in rows) for r, rows in differ.items()}
        listing = ", ".join(f"rank {r}: {len(differ[r])} row(s), up to {worst[str(r)]} id(s)" for r in bad)
        findings.append(Finding(
            code, "error", f"ranks {span(bad)} of DCP group {span(group)} consumed a different top-k than the rest "
                           f"({listing}): each rank attends its share of a different selection",
            ranks=bad, evidence={"rows": {str(r): [t for t, _, _ in rows] for r, rows in differ.items()},
                                 "ids_differing": worst,
                                 "ids_missing": {str(r): max(m for _, _, m in rows) for r, rows in differ.items()},
                                 "group": group}, **fw.where()))
    return findings


def _from_stats(fw: Forward, ranks: list[int]) -> Finding | None:
    counts = {r: fw.rows_valid("topk", r) for r in ranks}
    if any(c is None for c in counts.values()) or len({len(c) for c in counts.values()}) > 1:
        fw.skip("topk-divergence", "needs full tensors of topk (stats only, mode=stats)")
        return None
    fw.skip("topk-divergence", "which ids were selected needs full tensors of topk (stats only: counts compared)")
    reference = np.median(np.stack(list(counts.values())), axis=0)  # [T]
    bad = [r for r, c in counts.items() if not np.array_equal(c, reference)]
    if not bad:
        return None
    return Finding("topk-divergence", "error", f"ranks {span(bad)} selected a different number of ids per query row "
                   f"than the rest of their DCP group (from stats: valid ids per row)", ranks=bad,
                   evidence={"valid_per_row": {str(r): counts[r].tolist() for r in ranks}}, **fw.where())


def shard_masked(fw: Forward) -> list[Finding]:
    code = "shard-masked"
    findings = []
    for rec in fw.records("lse"):
        rank = rec.rank
        if int(rec.meta.get("dcp_size") or 1) < 2:
            fw.inapplicable(code, "DCP 1: nothing merged")
            continue
        if fw.record("slots", rank) is None:
            fw.skip(code, "slots not captured")
            continue
        lse, slots = fw.array("lse", rank), fw.array("slots", rank)
        if lse is None or slots is None:
            fw.needs_tensors(code, "lse/slots", rank)
            continue
        if lse.ndim != 2 or slots.ndim != 2 or lse.shape[0] != slots.shape[0]:
            fw.skip(code, f"rank {rank}: lse {list(lse.shape)} and slots {list(slots.shape)} do not pair up", gap=True)
            continue
        lse = natural_lse(lse, rec.meta)
        consumed = (slots >= 0).sum(axis=-1)  # [T]
        with np.errstate(invalid="ignore"):
            masked = (lse <= MASKED) & (consumed > 0)[:, None]  # [T, H]
        if not masked.any():
            continue
        rows = np.flatnonzero(masked.any(axis=1))
        offset = int(rec.meta.get("head_offset") or 0)
        heads = (np.flatnonzero(masked.any(axis=0)) + offset).tolist()
        cause = _cause(rec.meta, rows)
        findings.append(Finding(
            code, "error",
            f"rank {rank}: shard masked away: LSE -inf (merge weight 0) on {len(rows)} query row(s) for which it "
            f"consumed {int(consumed[rows].sum())} selected token(s), heads {span(heads)}" + (f"; {cause}" if cause else ""),
            ranks=[rank], heads=heads,
            evidence={"rows": rows.tolist(), "tokens_consumed": consumed[rows].tolist(),
                      "masked_values": int(masked.sum())}, **fw.where()))
    return findings


def _cause(meta: dict, rows: np.ndarray) -> str:
    """Why a row was masked, when the metadata shows it: a local length of 0 for a request the rank holds."""
    local, req_ids = meta.get("local_seq_lens"), meta.get("req_ids")
    if not local:
        return ""
    requests = [int(req_ids[t]) if req_ids is not None and t < len(req_ids) else int(t) for t in rows]
    zero = sorted({q for q in requests if q < len(local) and local[q] == 0})
    return f"local_seq_lens is 0 for request(s) {span(zero)} although the rank consumed their tokens" if zero else ""
