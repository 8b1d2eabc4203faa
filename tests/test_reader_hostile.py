"""Hostile input, all of it one line: every reader (ls, show, check, and tensortap.open().iter() with
tensor()) exits 2 with ONE line on stderr, within seconds, under a 2 GiB address-space cap.

The files are forged with h5py. All cases run in one capped child process (a process per case
would spend its time importing torch); each reader there has its own alarm, the child a timeout.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import zlib

import h5py
import numpy as np
import pytest

import tensortap
from tensortap.format import schema

CAP = 2 << 30
READERS = ("ls", "show", "check", "python")


def meta_of(seq: int, point: str = "lse", shape=(2, 4), dtype: str = "float32", **extra) -> dict:
    meta = {"name": f"layers.0.attn.{point}", "point": point, "seq": seq, "step": seq, "layer": 0, "rank": 0,
            "role": "target", "dtype": dtype, "shape": list(shape), "stored": True, "stats": {"nonfinite": 0},
            "time_ns": 1_000 + seq}
    meta.update(extra)
    return meta


def forge(path: str, records: list[tuple[dict, object]], root: dict | None = None, committed: bool = True,
          index_text: list[str] | None = None) -> str:
    """A segment: `records` are (meta, dataset maker or array); committed ones get their index."""
    with h5py.File(path, "w", libver=("v108", "v108")) as f:
        f.attrs["tensortap_format"] = 1
        attrs = {"host": "forge", "pid": 1, "start_time_ns": 1_000, "rank": 0, "run_id": "f0f0f0"}
        attrs.update(root or {})
        for key, value in attrs.items():
            if value is not None:  # None: leave the attribute out
                f.attrs[key] = value
        group = f.create_group("records")
        texts = []
        for meta, data in records:
            g = group.create_group(schema.record_group_name(meta["seq"]) if isinstance(meta.get("seq"), int)
                                   else f"{len(texts):012d}")
            if callable(data):
                data(g, meta)
            elif data is not None:
                g.create_dataset(meta["point"], data=data)
            text = json.dumps(meta)
            g.attrs["meta"] = text
            texts.append(text)
        if committed:
            f.create_dataset("index_meta", data=np.array(index_text or texts, dtype=object),
                             dtype=h5py.string_dtype("utf-8"))
            f.attrs["records"] = len(texts)
    return path


def forge_v2(path: str, batches: list[list[tuple[dict, np.ndarray | None]]], committed: bool = True,
             blob_maker=None, libver=("v108", "v108")) -> str:
    """A format-2 segment: each batch is a list of (meta, array or None); the arrays' bytes are laid out
    as the writer lays them out, and "batch"/"at" are added unless the meta already has them (a forger
    may set them wrong). `blob_maker(records_group, name, blob)` replaces how a batch dataset is made."""
    with h5py.File(path, "w", libver=libver) as f:
        f.attrs["tensortap_format"] = 2
        for key, value in {"host": "forge", "pid": 1, "start_time_ns": 1_000, "rank": 0, "run_id": "f0f0f0"}.items():
            f.attrs[key] = value
        group = f.create_group("records")
        texts = []
        for number, records in enumerate(batches):
            pieces, metas, offset = [], [], 0
            for meta, array in records:
                meta = dict(meta)
                meta.setdefault("batch", number)
                if array is not None:
                    raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
                    meta.setdefault("at", [offset, raw.size])
                    pad = -raw.size % 64
                    pieces += [raw, np.zeros(pad, np.uint8)]
                    offset += raw.size + pad
                metas.append(meta)
            blob = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
            name = f"{number:012d}"
            if blob_maker is not None:
                dataset = blob_maker(group, name, blob)
            else:
                dataset = group.create_dataset(name, data=blob)
            dataset.attrs["meta"] = json.dumps(metas)
            texts += [json.dumps(m) for m in metas]
        if committed:
            f.create_dataset("index_meta", data=np.array(texts, dtype=object), dtype=h5py.string_dtype("utf-8"))
            f.attrs["records"] = len(texts)
    return path


def bad_v2(change, reason, committed=True):
    """A format-2 segment of two good records in one batch, record 1's metadata changed by `change`."""
    def make(d):
        first = (meta_of(0, "q", (2, 4, 8)), np.ones((2, 4, 8), np.float32))
        meta = meta_of(1)
        change(meta)
        records = [first, (meta, np.zeros((2, 4), np.float32))]
        suffix = ".tap.h5" if committed else ".tap.h5.tmp"
        path = forge_v2(os.path.join(d, f"rank00000-forge-1-f0f0f0.00000{suffix}"), [records], committed=committed)
        return path, path, reason
    return make


def good_records(n: int = 2) -> list:
    return [(meta_of(i), np.full((2, 4), float(i), np.float32)) for i in range(n)]


# -- the cases ---------------------------------------------------------------------------------------
def case_fifo(d):
    forge(os.path.join(d, "rank00000-forge-1-f0f0f0.00000.tap.h5"), good_records())
    fifo = os.path.join(d, "rank00009-host-9.00000.tap.h5")
    os.mkfifo(fifo)
    return d, fifo, "is a FIFO, not a regular file"


def case_fifo_alone(d):
    fifo = os.path.join(d, "rank00009-host-9.00000.tap.h5")
    os.mkfifo(fifo)
    return fifo, fifo, "is a FIFO"


def case_bomb(d):
    """2 MiB of gzip declaring 2^31 bytes: the same compressed 4 MiB chunk of zeros, 512 times."""
    chunk = 4 << 20
    packed = zlib.compress(bytes(chunk), 9)

    def bomb(group, meta):
        ds = group.create_dataset("q", shape=(1 << 31,), dtype="u1", chunks=(chunk,), compression="gzip")
        for i in range((1 << 31) // chunk):
            ds.id.write_direct_chunk((i * chunk,), packed)

    path = forge(os.path.join(d, "rank00000-forge-1-f0f0f0.00000.tap.h5"),
                 [(meta_of(0, "q", (1 << 31,), "uint8"), bomb)])
    assert os.path.getsize(path) < 3 << 20
    return path, path, "declares 2.0 GiB in a"


def case_huge_shape(d):
    def huge(group, meta):
        group.create_dataset("q", shape=(1 << 36,), dtype="u1", chunks=(1 << 20,))

    path = forge(os.path.join(d, "rank00000-forge-1-f0f0f0.00000.tap.h5"),
                 [(meta_of(0, "q", (1 << 36,), "uint8"), huge)])
    assert os.path.getsize(path) < 64 << 10
    return path, path, "declares 64.0 GiB in a"


def case_markup_path(d):
    folder = os.path.join(d, "bad[")
    os.mkdir(folder)
    path = os.path.join(folder, "]rank00000-x-1.00000.tap.h5")  # the path holds "[/]"
    with open(path, "wb") as f:
        f.write(os.urandom(4096))
    return path, path, "not a readable HDF5 file"


def case_vds_index(d):
    source = os.path.join(d, "elsewhere.h5")
    with h5py.File(source, "w") as f:
        f.create_dataset("s", data=np.array([json.dumps(meta_of(0))], dtype=object), dtype=h5py.string_dtype())
    path = forge(os.path.join(d, "rank00000-forge-1-f0f0f0.00000.tap.h5"), good_records(1), committed=False)
    with h5py.File(path, "r+") as f:
        layout = h5py.VirtualLayout(shape=(1,), dtype=h5py.string_dtype())
        layout[:] = h5py.VirtualSource(source, "s", shape=(1,))
        f.create_virtual_dataset("index_meta", layout)
    return path, path, "'/index_meta' is a virtual dataset"


def bad_value(key, value, reason, committed=True):
    """A segment of two good records whose record 1 carries `key`: `value` (for show: point q)."""
    def make(d):
        records = [(meta_of(0, "q", (2, 4, 8)), np.ones((2, 4, 8), np.float32))]
        meta = meta_of(1)
        if key.startswith("stats."):
            meta["stats"][key[6:]] = value
        else:
            meta[key] = value
        records.append((meta, np.zeros((2, 4), np.float32)))
        suffix = ".tap.h5" if committed else ".tap.h5.tmp"
        path = forge(os.path.join(d, f"rank00000-forge-1-f0f0f0.00000{suffix}"), records, committed=committed)
        return path, path, reason
    return make


def bad_root(value, reason):
    def make(d):
        path = forge(os.path.join(d, "rank00000-forge-1-f0f0f0.00000.tap.h5"), good_records(),
                     root={"start_time_ns": value})
        return path, path, reason
    return make


CASES = {
    "fifo beside segments": case_fifo,
    "fifo alone": case_fifo_alone,
    "decompression bomb": case_bomb,
    "huge declared shape": case_huge_shape,
    "[/] in the path": case_markup_path,
    "virtual index_meta": case_vds_index,
    "non-integer step": bad_value("step", 1.5, "record 1 (layers.0.attn.lse): key 'step': step is not an integer"),
    "NaN layer": bad_value("layer", math.nan, "key 'layer': layer is not an integer (nan)"),
    "inf rank": bad_value("rank", math.inf, "key 'rank': rank is not an integer (inf)"),
    "null rank": bad_value("rank", None, "key 'rank': is null"),
    "null seq in a .tmp": bad_value("seq", None, "key 'seq': is null", committed=False),
    "unencodable string": bad_value("kv_format", "\udc80", "key 'kv_format' holds a string that is not valid Unicode"),
    "shape of the wrong type": bad_value("shape", "2x4", "key 'shape': shape is not a list of integers"),
    "stats of the wrong type": bad_value("stats.zero_heads", "two", "key 'stats.zero_heads': is not a count"),
    "root start_time_ns 'soon'": bad_root("soon", "root attribute 'start_time_ns' is not a non-negative integer"),
    "root start_time_ns NaN": bad_root(math.nan, "root attribute 'start_time_ns' is not a non-negative integer (nan)"),
    "root start_time_ns a list": bad_root([1, 2], "root attribute 'start_time_ns' is not a non-negative integer"),
    "v2: span of the wrong length": bad_v2(lambda m: m.update(at=[64, 31]), "record 1 (layers.0.attn.lse): key 'at': "
                                           "is not [offset, 32]"),
    "v2: span outside its batch": bad_v2(lambda m: m.update(at=[4096, 32]), "key 'at': bytes 4096..4128 lie outside "
                                         "the batch (320 bytes)", committed=False),
    "v2: stored record without a span": bad_v2(lambda m: m.update(at=None), "key 'at': is missing (the record is "
                                               "stored)"),
    "v2: negative batch": bad_v2(lambda m: m.update(batch=-3), "key 'batch': is negative (-3)"),
    "v2: crc32 out of range": bad_v2(lambda m: m.update(crc32=1 << 40), "record 1 (layers.0.attn.lse): key 'crc32': is not an unsigned 32-bit integer"),
    "v1 record claiming a batch": bad_value("batch", 0, "key 'batch': format 1 records have no such key"),
}

CHILD = textwrap.dedent("""
    import json, resource, signal, sys, time
    resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
    from typer.testing import CliRunner
    import tensortap
    from tensortap.cli import app

    def python_reader(path):
        try:
            d = tensortap.open(path)
            for rec in d.iter():
                if rec.stored:
                    rec.tensor()
            return (2 if d.warnings else 0), d.warnings
        except tensortap.TapError as exc:
            return 2, [str(exc)]

    class Hung(Exception):
        pass

    def alarm(*_):
        raise Hung()

    signal.signal(signal.SIGALRM, alarm)
    runner = CliRunner()
    results = []
    for name, path in json.loads(sys.argv[1]):
        for reader in {readers}:
            start = time.monotonic()
            signal.alarm(20)
            try:
                if reader == "python":
                    code, lines = python_reader(path)
                else:
                    args = [reader, path] + (["q"] if reader == "show" else []) + (["--no-oracle"] if reader == "check" else [])
                    result = runner.invoke(app, args, catch_exceptions=True)
                    code = result.exit_code
                    lines = [l for l in result.stderr.splitlines() if l.strip()]
                    if result.exception is not None and not isinstance(result.exception, SystemExit):
                        lines.append("EXCEPTION " + repr(result.exception))
            except Hung:
                code, lines = "hung", []
            except MemoryError:
                code, lines = "memory", []
            finally:
                signal.alarm(0)
            results.append(dict(case=name, reader=reader, code=code, lines=lines, seconds=time.monotonic() - start))
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{(case, reader): (exit code, stderr lines, seconds, expected reason, path)} from one capped child."""
    made = {}
    for i, (name, make) in enumerate(CASES.items()):
        directory = str(tmp_path_factory.mktemp(f"case{i}"))
        made[name] = make(directory)
    child = subprocess.run([sys.executable, "-c", CHILD.format(cap=CAP, readers=READERS),
                            json.dumps([(name, target) for name, (target, _, _) in made.items()])],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout.strip().splitlines()[-1])
    return {(r["case"], r["reader"]): (r["code"], r["lines"], r["seconds"], made[r["case"]][2], made[r["case"]][1])
            for r in results}


@pytest.mark.parametrize("case", list(CASES))
def test_one_line_exit_2_within_seconds_under_2_gib(outcomes, case):
    for reader in READERS:
        code, lines, seconds, reason, path = outcomes[(case, reader)]
        assert code == 2, (reader, code, lines)
        assert len(lines) == 1, (reader, lines)
        assert reason in lines[0] and path in lines[0], (reader, lines[0])
        assert seconds < 15, (reader, seconds)


def test_record_set_aside_the_rest_is_read(tmp_path):
    path = bad_value("dcp_size", "four", "")(str(tmp_path))[0]
    d = tensortap.open(path)
    assert len(d) == 1 and d[0].point == "q" and d[0].tensor().shape == (2, 4, 8)
    assert d.warnings == [f"{path}: record 1 (layers.0.attn.lse): key 'dcp_size': dcp_size is not an integer ('four')"]
    assert "1 record(s) set aside" in repr(d)


def test_markup_in_a_valid_dump_path_prints_as_text(tmp_path, cli):
    folder = tmp_path / "x[bold]y[" / "]z"
    folder.mkdir(parents=True)
    path = forge(str(folder / "rank00000-forge-1-f0f0f0.00000.tap.h5.tmp"), good_records(), committed=False)
    code, out, err = cli(["ls", str(folder.parent)])
    assert code == 0, err
    assert path in out, out  # the name as it is: neither styled nor a MarkupError


def remove_deep(top: str) -> None:
    """rm -r without recursion (shutil.rmtree, and so pytest's own cleanup, recurse once per level)."""
    stack = [(top, False)]
    while stack:
        path, visited = stack.pop()
        if visited:
            os.rmdir(path)
            continue
        stack.append((path, True))
        for entry in os.scandir(path):
            if entry.is_dir(follow_symlinks=False):
                stack.append((entry.path, False))
            else:
                os.unlink(entry.path)


def test_deep_directories_are_refused_in_one_line(cli):
    top = tempfile.mkdtemp(prefix="tensortap-deep-")  # not under tmp_path: pytest could not delete it
    try:
        deep = top
        for _ in range(1100):  # os.makedirs itself recurses
            deep = os.path.join(deep, "d")
            os.mkdir(deep)
        code, out, err = cli(["ls", top])
        assert code == 2 and len(err.strip().splitlines()) == 1 and "nested more than" in err, err
    finally:
        remove_deep(top)


def test_crc32_mismatch_names_the_record(tmp_path):
    data = np.arange(8, dtype=np.float32).reshape(2, 4)

    def with_crc(group, meta, crc):
        ds = group.create_dataset("lse", data=data)
        ds.attrs["crc32"] = np.uint32(crc)

    good = forge(str(tmp_path / "rank00000-forge-1-f0f0f0.00000.tap.h5"),
                 [(meta_of(0), lambda g, m: with_crc(g, m, zlib.crc32(data.tobytes())))])
    assert tensortap.open(good)[0].tensor().sum().item() == 28
    bad = forge(str(tmp_path / "rank00001-forge-2-f1f1f1.00000.tap.h5"),
                [(meta_of(0, rank=1), lambda g, m: with_crc(g, m, zlib.crc32(data.tobytes()) ^ 1))],
                root={"rank": 1, "pid": 2, "run_id": "f1f1f1"})
    with pytest.raises(tensortap.FormatError, match=r"record 0 \(layers.0.attn.lse\): stored bytes fail their crc32"):
        tensortap.open(bad)[0].tensor()


def test_compressed_records_within_bounds_are_read(tmp_path):
    data = np.zeros((64, 1024), np.float32)  # all zeros: gzip's best ratio, still a real record

    def gz(group, meta):
        group.create_dataset("lse", data=data, compression="gzip", chunks=(16, 1024))

    path = forge(str(tmp_path / "rank00000-forge-1-f0f0f0.00000.tap.h5"), [(meta_of(0, shape=(64, 1024)), gz)])
    assert tensortap.open(path)[0].tensor().abs().sum().item() == 0
