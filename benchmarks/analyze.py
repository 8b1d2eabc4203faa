"""`tensortap check` throughput and peak memory on a multi-GB dump (DESIGN section 8).

    python benchmarks/analyze.py [--dump DIR | --gib 2]

Each measurement runs `check` in a fresh child process and reads its peak RSS. Throughput
is the dump's size over the wall time (and the bytes `check` actually read over it).
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
start = time.perf_counter()
dump = tensortap.open(sys.argv[1])
report = check(dump, use_oracle=sys.argv[2] == "oracle")
seconds = time.perf_counter() - start
print(json.dumps(dict(seconds=seconds, bytes=dump.nbytes, read=report.bytes_read, records=report.records,
                      findings=len(report.findings), verdicts=[v.name for v in report.verdicts],
                      peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""


def measure(dump: str, oracle: bool) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, dump, "oracle" if oracle else "no-oracle"],
                            check=True, capture_output=True, text=True)
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
              f"{'peak RSS':>9} findings / verdict")
        for oracle in (False, True):
            r = measure(dump, oracle)
            print(f"{'oracle' if oracle else 'no oracle':<12} {r['bytes'] / 2**30:6.2f} {r['records']:8d} "
                  f"{r['seconds']:8.1f} {r['bytes'] / r['seconds'] / 1e6:7.0f} {r['read'] / r['seconds'] / 1e6:9.0f} "
                  f"{r['peak_rss'] / 2**20:7.0f}Mi {r['findings']} / {', '.join(r['verdicts']) or 'clean'}")
        print("targets: >= 200 MB/s without the oracle; peak RSS < 1 GiB")


if __name__ == "__main__":
    main()
