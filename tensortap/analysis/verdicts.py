"""Verdicts: what the findings of one (layer, role) add up to.

laundered consensus: pre-all-reduce evidence is anomalous, yet the hidden state after the
    row-parallel o_proj all-reduce is bit-identical on every rank, so every cross-rank check
    after it passes. `hidden` is the all-reduce's sum or, where the all-reduce is fused with RMSNorm,
    its post-norm output (hidden_kind "sum" or "post_norm"): both are identical across the TP group
    exactly when the sum is. From a mode=stats dump, the exact hash in hidden's stats decides.
divergent ranks: the same evidence, and the ranks disagree after the all-reduce too.
unverified consensus: the same evidence, but `hidden` was not captured on two ranks or more:
    whether the all-reduce laundered it cannot be told from this dump.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from tensortap.analysis.findings import Finding, Verdict
from tensortap.text import span

PRE_ALL_REDUCE = ("zero-heads", "empty-topk", "token-accounting", "topk-out-of-shard", "topk-divergence", "shard-masked",
                  "lse-sanity", "lse-nonfinite", "merge-mismatch", "no-merge", "query-divergence", "rank-outlier",
                  "kv-mutated", "oracle-mismatch", "nonfinite")


@dataclass
class Consensus:
    """Per (layer, role): the steps with pre-all-reduce anomalies, and what hidden did across ranks there."""

    anomalous_steps: set = field(default_factory=set)
    agreeing_steps: set = field(default_factory=set)
    disagreeing_steps: set = field(default_factory=set)
    ranks_compared: int = 0
    ranks_agreeing: int = 0

    def note(self, step, found: list[Finding], agreement: tuple[int, int] | None) -> None:
        """`agreement`: (ranks whose hidden equals their TP group's first, ranks compared), or None."""
        if not any(f.code in PRE_ALL_REDUCE and f.severity == "error" for f in found):
            return
        self.anomalous_steps.add(step)
        if agreement is None:
            return  # hidden not captured (or on one rank): unknown
        if agreement[0] == agreement[1]:
            self.agreeing_steps.add(step)
            self.ranks_agreeing, self.ranks_compared = agreement
        else:
            self.disagreeing_steps.add(step)


def build(findings: list[Finding], agreements: dict[tuple, Consensus]) -> list[Verdict]:
    by_place: dict[tuple, list[Finding]] = defaultdict(list)
    for f in findings:
        by_place[(f.layer, f.role)].append(f)
    verdicts = []
    for (layer, role), agreement in agreements.items():
        if not agreement.anomalous_steps:
            continue
        found = by_place[(layer, role)]
        steps = sorted(agreement.anomalous_steps, key=_step_key)
        what = _what_went_wrong(found, steps)
        if agreement.disagreeing_steps:
            name = "divergent ranks"
            after = "the ranks' hidden states disagree after the all-reduce too (visible to cross-rank checks)"
        elif agreement.agreeing_steps == agreement.anomalous_steps:
            name = "laundered consensus"
            after = (f"the o_proj all-reduce makes hidden bit-identical on {agreement.ranks_agreeing}/"
                     f"{agreement.ranks_compared} ranks")
        else:
            name = "unverified consensus"
            unknown = [s for s in steps if s not in agreement.agreeing_steps and s is not None]
            after = (f"hidden was not captured on two ranks or more at steps {span(unknown) or '-'}: whether the "
                     f"all-reduce laundered it is not in this dump (capture point hidden to tell)")
        cause = _cause(found)
        explanation = f"{role} layer {layer}: {what}; {after}" + (f"; cause: {cause}" if cause else "")
        verdicts.append(Verdict(name, layer, role, explanation, sorted({f.code for f in found}),
                                [s for s in steps if s is not None]))
    return verdicts


def _step_key(step):
    return (step is None, step if step is not None else 0)


def _what_went_wrong(found: list[Finding], steps: list) -> str:
    at = f" at steps {span([s for s in steps if s is not None])}" if any(s is not None for s in steps) else ""
    zero = [f for f in found if f.code == "zero-heads"]
    if zero:
        ranks = sorted({r for f in zero for r in f.ranks})
        heads = sorted({h for f in zero for h in f.heads})
        total = max((f.evidence.get("num_heads") or 0) for f in zero)
        of = f"/{total}" if total else ""
        return f"ranks {span(ranks)} emit all-zero attention for heads {span(heads)} ({len(heads)}{of}){at}"
    for code in PRE_ALL_REDUCE:
        first = next((f for f in found if f.code == code and f.severity == "error"), None)
        if first is not None:
            return f"{code}: {first.message}{at}"
    return f"anomalies{at}"


def _cause(found: list[Finding]) -> str:
    config = next((f for f in found if f.code == "config-mismatch"), None)
    if config is None:
        return ""
    ev = config.evidence
    cause = f"the layer believes dcp_size={ev.get('dcp_size')}, its process group has {ev.get('group_dcp_size')}"
    if ev.get("kv_dcp_size") not in (None, ev.get("group_dcp_size")):
        cause += f" and the cache writer {ev.get('kv_dcp_size')}"
    return cause
