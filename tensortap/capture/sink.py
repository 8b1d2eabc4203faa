"""The writer process: `python -m tensortap.capture.sink`, started by a tapped process.

Reads frames (frames.py) on stdin, computes each record's stats and writes the segments: the
only code of a capture that calls h5py, and it runs outside the server's GIL. End of input
(the server exited or was killed) commits the open segment. A write error is reported once
("E <message>") and the rest is counted as lost; the segment notes the loss where it can.
"""

from __future__ import annotations

import signal
import sys
import time

from tensortap.capture.frames import build_record, read_frame
from tensortap.format.segment import SegmentWriter
from tensortap.text import one_line


def serve(stdin, stdout) -> int:
    opening = read_frame(stdin)
    if opening is None or opening[0].get("k") != "open":
        return 2
    o = opening[0]
    segments = SegmentWriter(o["dir"], o["rank"], o["root_attrs"], o["compress"], o["segment_records"],
                             o["segment_bytes"])
    failed, lost, written = None, 0, 0

    def reply(line: str) -> None:
        stdout.write(line + "\n")
        stdout.flush()

    while True:
        frame = read_frame(stdin)
        if frame is None:  # the server is gone: commit what arrived
            break
        header, array = frame
        kind = header.get("k")
        if kind == "rec":
            if failed is not None:
                lost += 1
                continue
            try:
                segments.write(build_record(header["seq"], header["meta"], array, header["dtype"], header["point"],
                                            header["full"]))
                written += 1
            except Exception as exc:  # disk full, directory gone: report once, keep reading
                failed, lost = exc, lost + 1
                message = one_line(exc)
                reply(f"E {written} {message}")
                segments.mark_failure({"capture_error": message, "records_lost": lost, "failed_ns": time.time_ns()})
        elif kind == "flush":
            reply(f"F {header['id']}")
        elif kind == "close":
            if failed is None:
                try:
                    segments.close_segment(header.get("attrs") or {})
                except Exception as exc:
                    reply(f"E {written} {one_line(exc)}")
            reply("C")
            return 0
    if failed is None:
        segments.close_segment()
    return 0


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the server; it closes us
    sys.exit(serve(sys.stdin.buffer, sys.stdout))


if __name__ == "__main__":
    main()
