"""compbench/run.py: the pieces that make a killed run restartable."""

import os
from pathlib import Path

import pytest

from realign_pipeline.compbench.run import remove_partial_files, write_atomically


def test_write_atomically_leaves_only_the_finished_file(tmp_path):
    path = tmp_path / "scores" / "a.json"
    write_atomically(path, lambda temporary: temporary.write_text("{}"))
    assert path.read_text() == "{}"
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_a_write_that_fails_part_way_leaves_no_finished_file(tmp_path):
    path = tmp_path / "a.png"

    def fail_after_some_bytes(temporary: Path) -> None:
        temporary.write_bytes(b"\x89PNG")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, fail_after_some_bytes)
    assert not path.exists()
    assert remove_partial_files(tmp_path) == [tmp_path / f".a.png.{os.getpid()}.partial"]
    assert list(tmp_path.iterdir()) == []


def test_remove_partial_files_takes_only_temporary_names(tmp_path):
    samples = tmp_path / "images" / "base" / "color" / "samples"
    samples.mkdir(parents=True)
    kept = [samples / "a red car_000000.png", tmp_path / "manifest.json", samples / "notes.partial"]
    removed = [samples / ".a red car_000001.png.123.partial", tmp_path / ".manifest.json.7.partial"]
    for path in kept + removed:
        path.write_text("x")
    assert remove_partial_files(tmp_path) == sorted(removed)
    assert sorted(tmp_path.rglob("*.*")) == sorted(kept)


def test_remove_partial_files_on_a_folder_not_yet_made_removes_nothing(tmp_path):
    assert remove_partial_files(tmp_path / "new") == []
