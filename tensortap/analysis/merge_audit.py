"""The LSE-merge audit: recompute each rank's merged heads from the dumped per-rank partials.

Written from the formula (float64 numpy), not imported from the reference:

    lse_r <- -inf where NaN or +inf;  m = max_r lse_r (0 if all -inf)
    lse_g = m + log(sum_r exp(lse_r - m))
    f_r   = exp(lse_r - lse_g), NaN or +inf -> 0
    out   = sum_r f_r * out_r, exactly 0 where f_r == 0

and compared with `merged_out` of each rank (its own heads, located by head_offset), per
(token, head) row with the dtype's tolerance (tolerances.py). An LSE recorded with
`lse_base="2"` (log2, FlashInfer's sparse MLA) is turned into natural log first: lse_e = lse_2 * ln 2.
"""

from __future__ import annotations

import numpy as np

from tensortap.analysis.findings import Finding
from tensortap.analysis.forward import Forward
from tensortap.text import span
from tensortap.tolerances import tolerance


def merge(partials: np.ndarray, lses: np.ndarray) -> np.ndarray:
    """partials [N, T, H, D], lses [N, T, H] -> merged [T, H, D] (float64)."""
    with np.errstate(invalid="ignore", over="ignore"):
        clean = np.where(np.isnan(lses) | np.isposinf(lses), -np.inf, lses)  # [N, T, H]
        m = clean.max(axis=0)  # [T, H]
        m = np.where(np.isneginf(m), 0.0, m)  # [T, H]
        with np.errstate(divide="ignore"):
            lse_g = m + np.log(np.exp(clean - m).sum(axis=0))  # [T, H]
        delta = lses - lse_g  # [N, T, H]
        delta = np.where(np.isnan(delta) | np.isposinf(delta), -np.inf, delta)  # [N, T, H]
        weights = np.exp(delta)  # [N, T, H]
        scaled = np.where(weights[..., None] == 0, 0.0, partials * weights[..., None])  # [N, T, H, D]
    return scaled.sum(axis=0)  # [T, H, D]


def natural_lse(lse: np.ndarray, meta: dict) -> np.ndarray:
    """The LSE in natural log, whatever base the record says the backend returned (lse_base: e or 2)."""
    return lse * LN2 if str(meta.get("lse_base") or "e") == "2" else lse  # [T, H]


LN2 = float(np.log(2.0))


def merge_mismatch(fw: Forward) -> list[Finding]:
    findings = []
    code = "merge-mismatch"
    for group in fw.dcp_groups():
        if len(group) < 2 or any(int(fw.meta(r).get("dcp_size") or 1) < 2 for r in group):
            fw.inapplicable(code, "nothing merged (DCP 1)")
            continue  # nothing was merged here: no-merge / config-mismatch say why
        if any(fw.record(p, r) is None for p in ("partial_out", "lse", "merged_out") for r in group):
            fw.skip(code, "partial_out, lse or merged_out not captured on every rank of a DCP group")
            continue
        partials = [fw.array("partial_out", r) for r in group]
        lses = [fw.array("lse", r) for r in group]
        if any(x is None for x in partials + lses):
            fw.needs_tensors(code, "partial_out/lse", group[0])
            continue
        if len({p.shape for p in partials}) > 1 or len({x.shape for x in lses}) > 1 or partials[0].ndim != 3 \
                or lses[0].shape != partials[0].shape[:2]:
            fw.skip(code, "partial_out/lse shapes differ across the DCP group", gap=True)
            continue
        lses = [natural_lse(x, fw.record("lse", r).meta) for x, r in zip(lses, group)]
        merged = merge(np.stack(partials), np.stack(lses))  # [T, Hg, D]
        group_offset = int(fw.record("partial_out", group[0]).meta.get("head_offset") or 0)
        for rank in group:
            rec = fw.record("merged_out", rank)
            actual = fw.array("merged_out", rank)
            if rec is None or actual is None:
                continue
            start = int(rec.meta.get("head_offset") or 0) - group_offset
            expected = merged[:, start:start + actual.shape[1]]  # [T, H_tp, D]
            if expected.shape != actual.shape:
                fw.skip(code, f"merged_out of rank {rank} does not match its heads in the group's partials", gap=True)
                continue
            bad = tolerance(rec.dtype).row_excess(actual, expected) > 0  # [T, H_tp]: per (token, head)
            if bad.any():
                heads = (np.flatnonzero(bad.any(axis=0)) + start + group_offset).tolist()
                err = max_abs_error(actual, expected)
                findings.append(Finding(
                    "merge-mismatch", "error",
                    f"rank {rank}: merged output of heads {span(heads)} differs from the LSE merge of its DCP group's "
                    f"partials (max abs error {err:.3g}; {int(bad.sum())} (token, head) rows over tolerance)",
                    ranks=[rank], heads=heads, evidence={"max_abs_error": err, "rows_over_tolerance": int(bad.sum()),
                                                         "group": group}, **fw.where()))
    return findings


def max_abs_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest |actual - expected| over finite differences; inf when NaN meets a number (no warnings)."""
    with np.errstate(invalid="ignore", over="ignore"):
        same = (actual == expected) | (np.isnan(actual) & np.isnan(expected))
        diff = np.where(same, 0.0, np.abs(actual - expected))  # [...]
    diff = np.where(np.isnan(diff), np.inf, diff)
    return float(diff.max()) if diff.size else 0.0
