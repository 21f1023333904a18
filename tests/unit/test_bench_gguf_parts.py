"""gateway/bench/gguf_parts: a file split into two parts here, staged and joined there, checked
against its manifest."""

from __future__ import annotations

import os

import pytest

from gateway.bench.gguf_parts import join, main, split, stage


def test_split_stage_join_round_trip(tmp_path) -> None:
    data = os.urandom(3 * (1 << 20) + 12345)
    src = tmp_path / "model.gguf"
    src.write_bytes(data)
    carried = tmp_path / "carried"
    manifest = split(src, carried, first_bytes=1 << 20)
    assert manifest.name == "model.gguf.json"
    assert (carried / "model.gguf.part1").stat().st_size == 1 << 20
    # First call: only part 1 and the manifest travel; they are staged on the machine.
    call1, staging = tmp_path / "call1", tmp_path / "staging"
    call1.mkdir()
    for name in ("model.gguf.part1", "model.gguf.json"):
        (call1 / name).write_bytes((carried / name).read_bytes())
    assert stage(call1, staging) == ["model.gguf.part1"]
    with pytest.raises(FileNotFoundError, match="part model.gguf.part2 of model.gguf is missing"):
        join([call1, staging], staging)
    # Second call: part 2 and the manifest; the join finds part 1 where it was staged.
    call2 = tmp_path / "call2"
    call2.mkdir()
    for name in ("model.gguf.part2", "model.gguf.json"):
        (call2 / name).write_bytes((carried / name).read_bytes())
    out = join([call2, staging], staging)
    assert out == staging / "model.gguf" and out.read_bytes() == data
    assert join([call2, staging], staging) == out  # already there and intact


def test_a_damaged_part_is_refused(tmp_path, capsys) -> None:
    src = tmp_path / "m.gguf"
    src.write_bytes(os.urandom(4096))
    split(src, tmp_path / "d", first_bytes=1000)
    part = tmp_path / "d" / "m.gguf.part2"
    part.write_bytes(b"x" * part.stat().st_size)
    assert main(["join", "--dir", str(tmp_path / "d"), "--to", str(tmp_path / "out")]) == 1
    assert "part m.gguf.part2 of m.gguf is damaged" in capsys.readouterr().err
