"""The test set-up itself: missing requirements skip locally and fail under CI, and
.ci/system-packages.sh (run by ``make setup`` and .ci/run) agrees with the tests on what is missing."""

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import SYSTEM_PACKAGES, require_shared_data, require_system

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "system-packages.sh"


def test_missing_system_package_skips_locally(monkeypatch, tmp_path):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y --no-install-recommends chromium"):
        require_system("chromium", tmp_path / "no-chromium")


def test_missing_system_package_fails_under_ci(monkeypatch, tmp_path):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="dataset-fashion-mnist.*CI=true"):
        require_system("dataset-fashion-mnist", tmp_path / "no-dataset")


def test_present_system_path_is_returned(monkeypatch, tmp_path):
    monkeypatch.setenv("CI", "true")
    assert require_system("dataset-fashion-mnist", tmp_path) == tmp_path


def test_missing_shared_data_fails_under_ci(monkeypatch, tmp_path):
    monkeypatch.setenv("PRODCLASS_DATA", str(tmp_path))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="shared/data"):
        require_shared_data()
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        require_shared_data()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_system_package_script_agrees_with_the_tests():
    """``--check`` installs nothing; it names exactly the packages whose paths the tests miss."""
    out = subprocess.run(["bash", str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60)
    missing = sorted(p for p, path in SYSTEM_PACKAGES.items() if not path.exists())
    assert out.returncode == (1 if missing else 0), out.stderr
    for package in SYSTEM_PACKAGES:
        assert (package in out.stderr) == (package in missing), out.stderr
