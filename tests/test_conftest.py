"""The CI guard in conftest.py: with CI=true a skip whose reason is not allowed fails the session (a module-level
skip included); without CI it is reported and passes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = '''import pytest
def test_allowed(): pytest.skip("needs a CUDA GPU")
def test_runs(): pass
'''
MISSING = '''import pytest
pytest.importorskip("no_such_module_for_emorl")
def test_never(): pass
'''


def _pytest(folder: Path, ci: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CI=ci)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", *args, str(folder)],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=120)


def test_ci_fails_on_a_skip_that_should_run(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_a.py").write_text(TESTS)
    assert _pytest(tmp_path, "true").returncode == 0  # an allowed reason only
    (tmp_path / "test_b.py").write_text(MISSING)
    ci = _pytest(tmp_path, "true")
    assert ci.returncode == 1 and "1 test(s) skipped that must run here" in ci.stdout, ci.stdout[-2000:]
    assert "test_b.py: Skipped: could not import 'no_such_module_for_emorl'" in ci.stdout
    workers = _pytest(tmp_path, "true", "-n", "2")  # the README's command runs on pytest-xdist workers
    assert workers.returncode == 1 and "skipped that must run here" in workers.stdout, workers.stdout[-2000:]
    local = _pytest(tmp_path, "")
    assert local.returncode == 0 and "SKIPPED [1] test_b.py" in local.stdout  # -ra shows the reason
