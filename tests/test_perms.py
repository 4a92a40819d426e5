import os
import stat

import pytest

from dpolab.perms import atomic_path


def test_atomic_path_renames_on_success_with_a_plain_files_mode(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "sub" / "a.json") as tmp:
            tmp.write_text("{}")
            assert not (tmp_path / "sub" / "a.json").exists()  # nothing there until the block ends
    finally:
        os.umask(old)
    assert (tmp_path / "sub" / "a.json").read_text() == "{}"
    assert stat.S_IMODE((tmp_path / "sub" / "a.json").stat().st_mode) == 0o644
    assert os.listdir(tmp_path / "sub") == ["a.json"]


def test_atomic_path_leaves_the_old_file_and_no_temp_when_the_write_fails(tmp_path):
    (tmp_path / "a.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert (tmp_path / "a.json").read_text() == "old" and os.listdir(tmp_path) == ["a.json"]
