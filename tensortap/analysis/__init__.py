"""The analyzer: detectors over a dump, forward by forward, and the verdicts they add up to.

    report = tensortap.check("/scratch/tap")          # or a Dump
    report.verdicts, report.findings, report.exit_code
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Callable, Iterable

from tensortap.analysis import detectors, merge_audit, oracle, verdicts
from tensortap.analysis.findings import CODES, Finding, Report, Verdict
from tensortap.analysis.forward import Forward, forwards
from tensortap.dump import Dump

# Every detector, in report order; each maps a Forward to its findings.
DETECTORS: dict[str, Callable[[Forward], list[Finding]]] = {
    "config-mismatch": detectors.config_mismatch,
    "no-merge": detectors.no_merge,
    "query-divergence": detectors.query_divergence,
    "empty-topk": detectors.empty_topk,
    "topk-out-of-shard": detectors.topk_out_of_shard,
    "lse-nonfinite": detectors.lse_nonfinite,
    "nonfinite": detectors.nonfinite,
    "zero-heads": detectors.zero_heads,
    "merge-mismatch": merge_audit.merge_mismatch,
    "rank-outlier": detectors.rank_outlier,
}


def run_detector(code: str, dump: Dump) -> list[Finding]:
    """One detector over a whole dump (streaming forward by forward)."""
    if code == "oracle-mismatch":
        return [f for fw in forwards(dump) for f in oracle.oracle_mismatch(fw)]
    return [f for fw in forwards(dump) for f in DETECTORS[code](fw)]


def check(dump, use_oracle: bool = True, progress: Callable[[Iterable], Iterable] | None = None) -> Report:
    """Run every detector (and the oracle) over `dump` (a Dump or a path) and build the verdicts."""
    if not isinstance(dump, Dump):
        dump = Dump.open(dump)
    report = Report(records=len(dump))
    report.notes.extend(_dump_notes(dump))
    agreements: dict[tuple, verdicts.Consensus] = defaultdict(verdicts.Consensus)
    stream = forwards(dump)
    for fw in (progress(stream) if progress else stream):
        if fw.duplicates:
            report.notes.append(f"{fw.role} layer {fw.layer} step {fw.step}: {fw.duplicates} record(s) repeat a "
                                f"(point, rank) already seen and were not analysed; give each pass its own "
                                f"step or spec_pos")
        found = []
        for code, detector in DETECTORS.items():
            found.extend(_guarded(code, detector, fw, report.errors))
        if use_oracle:
            found.extend(_guarded("oracle-mismatch", lambda f: oracle.oracle_mismatch(f, report.notes), fw,
                                  report.errors))
        agreements[(fw.layer, fw.role)].note(fw.step, found, detectors.hidden_agreement(fw))
        report.findings.extend(found)
        report.bytes_read += fw.bytes_read
    report.verdicts = verdicts.build(report.findings, agreements)
    return report


def _guarded(code: str, detector, fw: Forward, errors: list[str]) -> list[Finding]:
    """A detector that breaks on a strange dump costs one error line (and exit code 2), not the report."""
    try:
        return detector(fw)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"detector {code} failed on {fw.role} layer {fw.layer} step {fw.step}: {type(exc).__name__}: {exc}")
        return []


def _dump_notes(dump: Dump) -> list[str]:
    notes = [f"truncated segment {os.path.basename(s.path)}: {s.records} record(s) analysed; {s.truncation}"
             for s in dump.truncated]
    notes += [f"rank {rank} dropped {n} record(s) (on_full=drop): checks that need them were skipped"
              for rank, n in dump.dropped.items()]
    notes += [f"capture error: {line}" for line in dump.capture_errors]
    return notes


__all__ = ["CODES", "DETECTORS", "Finding", "Report", "Verdict", "check", "run_detector"]
