"""`tensortap check` throughput and peak memory on a multi-GB dump (DESIGN section 8).

    python benchmarks/analyze.py [--dump DIR | --gib 2]

Each measurement runs `check` in a fresh child process and reads its peak RSS. Throughput
is the dump's size over the wall time (and the bytes `check` actually read over it). The
baseline, measured in the same run, reads every record's tensor once and does nothing else:
check's ratio to it is what the detectors cost on top of the I/O.
Targets: >= 200 MB/s without the oracle, peak RSS < 1 GiB whatever the dump's size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, resource, sys, time
import tensortap
from tensortap.analysis import check
import pandas  # noqa: F401  (imported by the reader's tables either way; not part of the measurement)
start = time.perf_counter()
dump = tensortap.open(sys.argv[1])
if sys.argv[2] == "read":
    read = sum(rec.raw().nbytes for rec in dump.iter() if rec.stored)
    findings, verdicts = 0, []
else:
    report = check(dump, use_oracle=sys.argv[2] == "oracle")
    read, findings, verdicts = report.bytes_read, len(report.findings), [v.name for v in report.verdicts]
seconds = time.perf_counter() - start
print(json.dumps(dict(seconds=seconds, bytes=dump.nbytes, read=read, records=len(dump), findings=findings,
                      verdicts=verdicts, peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""


def measure(dump: str, mode: str) -> dict:
    """mode: read (the baseline), no-oracle, oracle."""
    result = subprocess.run([sys.executable, "-c", CHILD, dump, mode], check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", help="an existing dump (default: generate one)")
    parser.add_argument("--gib", type=float, default=2.0, help="size of the generated dump")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bigdump import dumps

    with dumps([args.dump], args.gib) as (dump,):
        print(f"{'check':<12} {'GiB':>6} {'records':>8} {'seconds':>8} {'MB/s':>7} {'read MB/s':>9} "
              f"{'x read':>6} {'peak RSS':>9} findings / verdict")
        baseline = None
        for mode in ("read", "no-oracle", "oracle"):
            r = measure(dump, mode)
            rate = r["bytes"] / r["seconds"]
            baseline = baseline or rate
            print(f"{mode:<12} {r['bytes'] / 2**30:6.2f} {r['records']:8d} {r['seconds']:8.1f} {rate / 1e6:7.0f} "
                  f"{r['read'] / r['seconds'] / 1e6:9.0f} {rate / baseline:6.2f} {r['peak_rss'] / 2**20:7.0f}Mi "
                  f"{r['findings']} / {', '.join(r['verdicts']) or 'clean'}")
        print("targets: >= 200 MB/s without the oracle; peak RSS < 1 GiB")


if __name__ == "__main__":
    main()
