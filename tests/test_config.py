"""The TAP grammar: valid values parse, malformed ones fail in one line naming the key."""

import pytest

import tensortap
from tensortap.config import VALID_KEYS, IntSet, parse_tap
from tensortap.errors import TapConfigError


def test_disabled_values():
    assert parse_tap(None) is None
    assert parse_tap("") is None
    assert parse_tap("  ") is None
    assert parse_tap("0") is None


def test_full_example():
    c = parse_tap("/scratch/tap;layers=0,78;steps=100-140;roles=draft;points=q,topk,partial_out,lse")
    assert c.dir == "/scratch/tap"
    f = c.filter
    assert 0 in f.layers and 78 in f.layers and 1 not in f.layers
    assert 100 in f.steps and 140 in f.steps and 141 not in f.steps and 99 not in f.steps
    assert f.roles == {"draft"}
    assert f.points == {"q", "topk", "partial_out", "lse"}
    assert f.ranks is None
    assert c.mode == "full" and c.on_full == "block" and c.max_bytes is None


def test_keys_sizes_and_dir_key():
    c = parse_tap("dir=/x;mode=stats;max_bytes=20G;on_full=drop;ranks=1-2;compress=lzf")
    assert c.dir == "/x" and c.mode == "stats" and c.on_full == "drop" and c.compress == "lzf"
    assert c.max_bytes == 20 << 30
    assert parse_tap("/x;max_bytes=512M").max_bytes == 512 << 20
    assert parse_tap("/x;max_bytes=4096").max_bytes == 4096
    assert parse_tap("/x;max_bytes=1.5K").max_bytes == 1536


def test_filter_keeps():
    f = parse_tap("/x;layers=3;steps=0-1;ranks=0;points=lse;roles=target").filter
    assert f.keeps("lse", 3, 1, 0, "target")
    assert not f.keeps("q", 3, 1, 0, "target")
    assert not f.keeps("lse", 4, 1, 0, "target")
    assert not f.keeps("lse", 3, 2, 0, "target")
    assert not f.keeps("lse", 3, 1, 1, "target")
    assert not f.keeps("lse", 3, 1, 0, "draft")
    assert not f.keeps("lse", 3, None, 0, "target"), "a record with no step is not kept when steps= is set"


@pytest.mark.parametrize(
    "value, named",
    [
        ("/x;layer=3", "'layer'"),
        ("/x;layers=a", "'layers'"),
        ("/x;steps=5-2", "'steps'"),
        ("/x;mode=everything", "'mode'"),
        ("/x;on_full=wait", "'on_full'"),
        ("/x;max_bytes=lots", "'max_bytes'"),
        ("/x;points=q,lsee", "'points'"),
        ("/x;roles=verifier", "'roles'"),
        ("/x;layers=1;layers=2", "'layers'"),
        ("layers=1", "directory"),
        ("/x;garbage", "'garbage'"),
    ],
)
def test_malformed_values_fail_in_one_line(value, named):
    with pytest.raises(TapConfigError) as info:
        parse_tap(value)
    message = str(info.value)
    assert "\n" not in message
    assert named in message


def test_unknown_key_lists_valid_keys():
    with pytest.raises(TapConfigError, match="valid keys: " + ", ".join(VALID_KEYS)):
        parse_tap("/x;layer=3")


def test_configure_takes_the_same_keys(tap_dir):
    config = tensortap.configure(dir=tap_dir, layers=[0, 78], steps=range(3, 6), roles="draft", mode="stats")
    assert tensortap.enabled()
    assert 78 in config.filter.layers and 5 in config.filter.steps and 6 not in config.filter.steps
    assert config.mode == "stats"
    with pytest.raises(TapConfigError, match="'layer'"):
        tensortap.configure(dir=tap_dir, layer=3)
    tensortap.configure()
    assert not tensortap.enabled()


def test_intset_str_roundtrip():
    s = IntSet.parse("layers", "0,3-5,78")
    assert str(s) == "0,3-5,78"
    assert IntSet.parse("layers", str(s)) == s
