"""LSE sanity: each rank's recorded log-sum-exp against a float64 recompute over the slots it consumed.

For rank r, query row t and head h (the heads of its `q`, which are those of its `lse`):

    expected[t, h] = log sum_{k: slots[t, k] >= 0} exp(scale * q[t, h] . kv[slots[t, k]])

with kv read from r's own dumped pages (dequantised fp8_ds_mla). The recorded value is first
turned into natural log by its `lse_base` ("2": lse * ln 2). Compared where both are finite
(a -inf on a row that consumed slots is `shard-masked`, NaN is `lse-nonfinite`), with

    |recorded - expected| <= 1e-3 * (1 + |expected|)

The mismatches are named by what they look like:
    recorded / expected ~ 1 / ln 2 = 1.4427     "LSE in base 2" (a base-2 backend recorded as e)
    recorded all 0, or all one value             "LSE not computed"
    anything else                                "LSE off the oracle" (garbage)
Part of the oracle tier: it runs when `check` recomputes (not with --no-oracle).
"""

from __future__ import annotations

import numpy as np

from tensortap.analysis.findings import Finding
from tensortap.analysis.forward import Forward
from tensortap.analysis.merge_audit import natural_lse
from tensortap.analysis.oracle import ORACLE_ROWS, Incomplete, read_slots
from tensortap.text import span

CODE = "lse-sanity"
RTOL = 1e-3
BASE2_RATIO = 1.0 / np.log(2.0)  # log2(x) / ln(x)


def logsumexp_over(q: np.ndarray, kv: np.ndarray, valid: np.ndarray, scale: float) -> np.ndarray:
    """q [T, H, 576], kv [T, K, 576], valid [T, K] -> lse [T, H] float64 (-inf where nothing is valid)."""
    scores = np.matmul(q, kv.transpose(0, 2, 1)) * scale  # [T, H, K]
    scores = np.where(valid[:, None, :], scores, -np.inf)  # [T, H, K]
    top = scores.max(axis=-1, keepdims=True) if scores.shape[-1] else np.full(scores.shape[:-1] + (1,), -np.inf)
    top = np.where(np.isfinite(top), top, 0.0)  # [T, H, 1]
    with np.errstate(divide="ignore"):
        return np.log(np.exp(scores - top).sum(axis=-1)) + top[..., 0]  # [T, H]


def expected_lse(fw: Forward, rank: int) -> np.ndarray:
    """The recompute [T, H] of a rank's LSE over the slots it consumed; raises Incomplete when it cannot."""
    q, slots, meta = fw.array("q", rank), fw.array("slots", rank), fw.meta(rank)
    if q is None or slots is None:
        raise Incomplete("needs full tensors of q and slots")
    if q.ndim != 3 or slots.ndim != 2 or q.shape[0] != slots.shape[0] or meta.get("softmax_scale") is None:
        raise Incomplete(f"rank {rank}: q {list(q.shape)} and slots {list(slots.shape)} do not pair up", gap=True)
    scale = float(meta["softmax_scale"])
    out = np.full(q.shape[:2], -np.inf)  # [T, H]
    for start in range(0, q.shape[0], ORACLE_ROWS):  # bounded memory
        rows = slice(start, start + ORACLE_ROWS)
        s = slots[rows]  # [t, K]
        valid = s >= 0  # [t, K]
        if not valid.any():
            continue
        kv = np.zeros(s.shape + (q.shape[-1],))  # [t, K, 576]
        kv[valid] = read_slots(fw, rank, s[valid])[..., : q.shape[-1]]  # [M, 576]
        out[rows] = logsumexp_over(q[rows], kv, valid, scale)  # [t, H]
    return out


def lse_sanity(fw: Forward) -> list[Finding]:
    findings = []
    for rec in fw.records("lse"):
        rank = rec.rank
        if fw.record("q", rank) is None or fw.record("slots", rank) is None or fw.record("kv_pages", rank) is None:
            fw.skip(CODE, "q, slots or kv_pages not captured")
            continue
        recorded = fw.array("lse", rank)
        if recorded is None:
            fw.needs_tensors(CODE, "lse", rank)
            continue
        try:
            expected = expected_lse(fw, rank)  # [T, H]
        except Incomplete as why:
            fw.skip(CODE, str(why), gap=why.gap)
            continue
        if expected.shape != recorded.shape:
            fw.skip(CODE, f"rank {rank}: lse {list(recorded.shape)} and q heads {list(expected.shape)} differ", gap=True)
            continue
        found = _judge(fw, rec, natural_lse(recorded, rec.meta), expected)
        if found is not None:
            findings.append(found)
    return findings


def _judge(fw: Forward, rec, recorded: np.ndarray, expected: np.ndarray) -> Finding | None:
    both = np.isfinite(recorded) & np.isfinite(expected)  # [T, H]
    if not both.any():
        return None
    rec_f, exp_f = np.where(both, recorded, 0.0), np.where(both, expected, 0.0)  # [T, H]
    bad = both & (np.abs(rec_f - exp_f) > RTOL * (1 + np.abs(exp_f)))  # [T, H]
    if not bad.any():
        return None
    r, e = recorded[bad], expected[bad]  # [M]
    big = np.abs(e) > 0.1
    ratio = float(np.median(r[big] / e[big])) if big.any() else float("nan")
    if np.all(recorded[both] == 0):
        kind, cause = "LSE not computed", "the backend returned zeros"
    elif np.ptp(recorded[both]) == 0:
        kind, cause = "LSE not computed", f"every value is {float(recorded[both][0]):.4g}"
    elif big.any() and abs(ratio - BASE2_RATIO) < 1e-2 * BASE2_RATIO and \
            np.allclose(r[big] / e[big], BASE2_RATIO, rtol=2e-2):
        kind, cause = "LSE in base 2", "recorded / recomputed = 1/ln 2 = 1.443: a log2 LSE merged as natural log " \
                                       "(record lse_base=2, or convert it before the merge)"
    else:
        kind, cause = "LSE off the oracle", f"median recorded / recomputed {ratio:.3g}"
    offset = int(rec.meta.get("head_offset") or 0)
    heads = (np.flatnonzero(bad.any(axis=0)) + offset).tolist()
    worst = float(np.max(np.abs(r - e)))
    return Finding(CODE, "error",
                   f"rank {rec.rank}: {kind}: {int(bad.sum())} of {int(both.sum())} (token, head) LSE values differ "
                   f"from the logsumexp of the slots it consumed (max abs error {worst:.3g}; {cause})",
                   ranks=[rec.rank], heads=heads,
                   evidence={"kind": kind, "ratio": ratio, "max_abs_error": worst, "values_over_tolerance": int(bad.sum()),
                             "values_compared": int(both.sum()), "lse_base": rec.meta.get("lse_base") or "e",
                             "recorded_sample": [float(x) for x in r[:3]], "recomputed_sample": [float(x) for x in e[:3]]},
                   **fw.where())
