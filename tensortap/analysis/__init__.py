"""The analyzer: detectors over a dump, forward by forward, and the verdicts they add up to.

    report = tensortap.check("/scratch/tap")          # or a Dump
    report.verdicts, report.findings, report.exit_code, report.coverage

Every detector reports, per forward, whether it verified it, had nothing to check, or skipped it
and why (`Forward.skip`); `report.coverage` adds that up, and "clean" needs no skip that a bug
could cause (`Report.verified`).
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Callable, Iterable

from tensortap.analysis import accounting, detectors, kvstate, lse_check, merge_audit, oracle, selection, verdicts
from tensortap.analysis.findings import CODES, Coverage, Finding, Report, Verdict
from tensortap.analysis.forward import Forward, forwards
from tensortap.dump import Dump
from tensortap.vocab import TRIGGER_POINT

# Every stateless detector, in report order; each maps a Forward to its findings.
DETECTORS: dict[str, Callable[[Forward], list[Finding]]] = {
    "config-mismatch": detectors.config_mismatch,
    "no-merge": detectors.no_merge,
    "query-divergence": detectors.query_divergence,
    "empty-topk": detectors.empty_topk,
    "topk-out-of-shard": detectors.topk_out_of_shard,
    "token-accounting": accounting.token_accounting,
    "topk-divergence": selection.topk_divergence,
    "lse-nonfinite": detectors.lse_nonfinite,
    "shard-masked": selection.shard_masked,
    "nonfinite": detectors.nonfinite,
    "zero-heads": detectors.zero_heads,
    "merge-mismatch": merge_audit.merge_mismatch,
    "rank-outlier": detectors.rank_outlier,
}
# Detectors that remember earlier forwards: a fresh instance per check.
STATEFUL: dict[str, Callable[[], Callable[[Forward], list[Finding]]]] = {
    "kv-mutated": kvstate.KVHistory,
}
# The float64 recompute tier (off with --no-oracle).
ORACLE: dict[str, Callable[[Forward], list[Finding]]] = {
    "oracle-mismatch": oracle.oracle_mismatch,
    "lse-sanity": lse_check.lse_sanity,
}
LOSS_NAMES = {"dropped": "dropped (on_full=drop)", "over_budget": "over budget (max_bytes stopped capture)",
              "lost": "lost by the writer", "errors": "tap point errors", "graph_skipped": "skipped inside CUDA graphs"}


def all_codes(use_oracle: bool = True) -> list[str]:
    return [*DETECTORS, *STATEFUL, *(ORACLE if use_oracle else {})]


def run_detector(code: str, dump) -> list[Finding]:
    """One detector over a whole dump (streaming forward by forward)."""
    if not isinstance(dump, Dump):
        dump = Dump.open(dump)
    detector = STATEFUL[code]() if code in STATEFUL else {**DETECTORS, **ORACLE}[code]
    return [f for fw in forwards(dump) for f in detector(fw)]


def check(dump, use_oracle: bool = True, progress: Callable[[Iterable], Iterable] | None = None) -> Report:
    """Run every detector (and the oracle) over `dump` (a Dump or a path) and build the verdicts."""
    if not isinstance(dump, Dump):
        dump = Dump.open(dump)
    report = Report(records=len(dump))
    losses = _losses(dump)
    report.notes.extend(_dump_notes(dump, losses))
    running = {**DETECTORS, **{code: make() for code, make in STATEFUL.items()}, **(ORACLE if use_oracle else {})}
    report.coverage = {code: Coverage() for code in running}
    agreements: dict[tuple, verdicts.Consensus] = defaultdict(verdicts.Consensus)
    stream = forwards(dump)
    for fw in (progress(stream) if progress else stream):
        report.forwards += 1
        if fw.duplicates:
            report.notes.append(f"{fw.role} layer {fw.layer} step {fw.step}: {fw.duplicates} record(s) repeat a "
                                f"(point, rank) already seen and were not analysed; give each pass its own "
                                f"step or spec_pos")
        found = []
        for code, detector in running.items():
            found.extend(_guarded(code, detector, fw, report.errors))
            report.coverage[code].add(fw.status.get(code))
        found.extend(_hidden_losses(fw, losses))
        agreement = _guarded("hidden agreement", lambda f: [detectors.hidden_agreement(f)], fw, report.errors)
        agreements[(fw.layer, fw.role)].note(fw.step, found, agreement[0] if agreement else None)
        report.findings.extend(found)
        report.bytes_read += fw.bytes_read
        fw.release()
    report.verdicts = verdicts.build(report.findings, agreements)
    return report


def _guarded(code: str, detector, fw: Forward, errors: list[str]) -> list:
    """A detector that breaks on a strange dump costs one error line naming the record (and exit code 2),
    not the report."""
    try:
        return detector(fw)
    except Exception as exc:  # noqa: BLE001
        last = fw.describe_last()
        errors.append(f"detector {code} failed on {fw.role} layer {fw.layer} step {fw.step}"
                      + (f" spec_pos {fw.spec_pos}" if fw.spec_pos is not None else "")
                      + (f" (record {last})" if last else "") + f": {type(exc).__name__}: {exc}")
        fw.status[code] = ("skipped", "detector failed", True)
        return []


def _losses(dump: Dump) -> dict[int, dict[str, int]]:
    """rank -> {loss name: nonzero total} from the writers' totals (Dump.losses) and dropped counters."""
    out: dict[int, dict[str, int]] = defaultdict(dict)
    frame = getattr(dump, "losses", None)
    if frame is not None and len(frame):
        for row in frame.to_dict(orient="records"):
            for column, value in row.items():
                name = str(column).removesuffix("_total")
                if name not in LOSS_NAMES or value is None or value != value:  # NaN / <NA>
                    continue
                try:
                    value = int(value)
                except (TypeError, ValueError):
                    continue
                if value > 0 and row.get("rank") is not None:
                    rank = int(row["rank"])
                    out[rank][name] = out[rank].get(name, 0) + value
    for rank, n in dump.dropped.items():
        out[rank]["dropped"] = max(out[rank].get("dropped", 0), int(n))
    return {r: {k: v[k] for k in LOSS_NAMES if k in v} for r, v in sorted(out.items()) if v}


def _dump_notes(dump: Dump, losses: dict[int, dict[str, int]]) -> list[str]:
    notes = [f"truncated segment {os.path.basename(s.path)}: {s.records} record(s) analysed; {s.truncation}"
             for s in dump.truncated]
    for rank, totals in losses.items():
        listing = ", ".join(f"{n} {LOSS_NAMES[name]}" for name, n in totals.items())
        notes.append(f"rank {rank} lost records: {listing}; checks that need them were skipped")
    notes += [f"capture error: {line}" for line in dump.capture_errors]
    notes += [_trigger_note(rec.meta) for rec in dump.select(point=TRIGGER_POINT).iter()] if TRIGGER_POINT in dump.points else []
    return notes


def _trigger_note(meta: dict) -> str:
    """The flight recorder's trigger record, as one line: which trigger fired, where and when."""
    t = meta.get("trigger") or {}
    where = " ".join(f"{k} {t[k]}" for k in ("role", "layer", "step", "spec_pos", "rank") if t.get(k) is not None)
    return (f"flight recorder: trigger {t.get('trigger', '?')} fired on {t.get('point', '?')} ({where}); "
            f"the dump holds the ring of steps before it and the steps captured after it")


def _hidden_losses(fw: Forward, losses: dict[int, dict[str, int]]) -> list[Finding]:
    """A finding where a rank's losses hide evidence: points that other ranks of this forward have are
    missing on a rank whose writer reports losses."""
    if not losses:
        return []
    everywhere = {rec.point for rec in fw.items()}
    findings = []
    for rank in fw.ranks():
        if rank not in losses:
            continue
        missing = sorted(everywhere - {p for p in everywhere if fw.record(p, rank) is not None})
        if not missing:
            continue
        totals = losses[rank]
        graph = "graph_skipped" in totals
        findings.append(Finding(
            "capture-loss", "warning",
            f"rank {rank} is missing {', '.join(missing)} that other ranks recorded "
            f"({', '.join(f'{n} {LOSS_NAMES[k]}' for k, n in totals.items())}): the checks that need them could not "
            f"judge this rank" + ("; capture those points outside the graph or in eager mode" if graph else ""),
            ranks=[rank], evidence={"missing_points": missing, "losses": totals}, **fw.where()))
    return findings


__all__ = ["CODES", "DETECTORS", "ORACLE", "STATEFUL", "Coverage", "Finding", "Report", "Verdict", "all_codes", "check",
           "run_detector"]
