"""prodclass.io: atomic writes respect the umask (issue 16, finding 12) and the exclusive lock file."""

import os
import stat
import subprocess
import sys

import pytest

from prodclass.io import write_bytes, write_json, write_text


@pytest.fixture
def umask():
    """Set the process umask for one test (``umask(0o027)``), restoring it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600), (0o000, 0o666)],
                         ids=["umask022", "umask002", "umask077", "umask000"])
def test_new_files_respect_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    write_text(tmp_path / "a.txt", "x")
    write_json(tmp_path / "sub" / "b.json", {"a": 1})
    assert _mode(tmp_path / "a.txt") == expected and _mode(tmp_path / "sub" / "b.json") == expected
    with open(tmp_path / "plain.txt", "w") as f:  # the same mode a plain open() gives
        f.write("x")
    assert _mode(tmp_path / "plain.txt") == expected


def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "report.html"
    write_bytes(path, b"old")
    os.chmod(path, 0o640)
    write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and _mode(path) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left


def test_umask_matches_a_child_shell(tmp_path, umask):
    from prodclass.io import current_umask

    umask(0o027)
    shell = subprocess.run(["sh", "-c", "umask"], capture_output=True, text=True, check=True).stdout.strip()
    assert current_umask() == int(shell, 8) == 0o027


def test_exclusive_lock_excludes_a_second_holder_and_is_removed(tmp_path):
    from prodclass.io import LockedError, exclusive_lock

    lock = tmp_path / "out.csv.lock"
    with exclusive_lock(lock):
        assert lock.is_file()
        with pytest.raises(LockedError, match=r"out\.csv\.lock: locked by another running process"):
            with exclusive_lock(lock):
                pass
        # another process is refused too (flock locks are per open file, not per process)
        code = ("import sys; from prodclass.io import exclusive_lock, LockedError\n"
                "try:\n    exclusive_lock(sys.argv[1]).__enter__()\nexcept LockedError:\n    sys.exit(3)")
        assert subprocess.run([sys.executable, "-c", code, str(lock)]).returncode == 3
    assert not lock.exists()
    with exclusive_lock(lock):  # free again
        pass


def test_lock_left_by_a_killed_job_is_taken_over(tmp_path):
    from prodclass.io import exclusive_lock

    lock = tmp_path / "out.csv.lock"
    lock.write_text("")  # a killed holder leaves the file, but its lock died with it
    with exclusive_lock(lock) as held:
        assert held == lock
    assert not lock.exists()
