"""The two atomic-write helpers: one file (atomic_writer), one folder (atomic_directory)."""
import pytest

from emclip.paths import atomic_directory, write_text_atomic


def test_write_text_atomic_replaces_and_a_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    write_text_atomic(target, "old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new"

    def boom(*_):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        write_text_atomic(target, "lost")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_directory_replaces_a_folder_whole(tmp_path):
    target = tmp_path / "best"
    with atomic_directory(target) as tmp:
        assert tmp.parent == tmp_path and not target.exists()
        (tmp / "a").write_text("1")
        (tmp / "b").write_text("1")
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["a"] and (target / "a").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["best"]           # no temporary or set-aside folder left


def test_atomic_directory_failure_leaves_the_old_folder(tmp_path):
    target = tmp_path / "step_000001"
    with atomic_directory(target) as tmp:
        (tmp / "meta.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "meta.json").write_text("half")
            raise RuntimeError("killed while writing")
    assert (target / "meta.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]


def test_atomic_directory_takes_subfolders(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "text").mkdir()
        (tmp / "text" / "vocab.txt").write_text("a\nb\n")
        (tmp / "config.json").write_text("{}")
    assert (target / "text" / "vocab.txt").read_text() == "a\nb\n"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
