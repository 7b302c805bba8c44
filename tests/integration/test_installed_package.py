"""The package works installed, not only from the source tree: a non-editable ``pip install``
of what the image copies (pyproject.toml and the four packages) into a fresh venv in a temp
directory, then ``meter migrate`` on a new embedded store, run from another directory.

Fast by design: no dependency is downloaded or installed (``--no-deps``, no build isolation);
the fresh venv sees the project venv's third-party packages through a path entry, behind its
own site-packages, so it imports the installed copy of our code and never the source tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.integration.helpers import REPO_ROOT
from worker.store.migrations import discover

pytestmark = [pytest.mark.clickhouse, pytest.mark.no_kafka, pytest.mark.packaging]

SOURCES = ("pyproject.toml", "schemas", "worker", "node", "common")


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _fresh_venv(root: Path) -> Path:
    """A venv without pip whose only extra path is the project venv's site-packages (the
    dependencies), after its own (our code, once installed)."""
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root)
    python = venv / "bin" / "python"
    own = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], root).strip())
    # A plain path line: the .pth files there (the project's own editable install) are not read.
    (own / "project-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return venv


def test_pip_install_then_meter_migrate_from_anywhere(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)
    venv = _fresh_venv(tmp_path)
    python = str(venv / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", python, "--disable-pip-version-check", "--no-input"]
    _run([*pip, "install", "--no-deps", "--no-build-isolation", "--no-index", str(source)], tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METER_", "PYTHON"))}
    where = _run([python, "-c", "import worker.store.migrations as m; print(m.__file__)"], elsewhere, env)
    assert Path(where.strip()).is_relative_to(venv), f"imported from {where.strip()}, not the installed copy"
    shipped = "from importlib.resources import files; print((files('worker.analytics') / 'static').is_dir())"
    assert _run([python, "-c", shipped], elsewhere, env).strip() == "True", "the dashboard files are not installed"

    env |= {"METER_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'store'}", "METER_CLICKHOUSE_DATABASE": "installed"}
    meter = str(venv / "bin" / "meter")
    out = _run([meter, "migrate"], elsewhere, env)
    assert f"applied {len(discover())} migration(s)" in out, out
    again = _run([meter, "migrate"], elsewhere, env)
    assert again.startswith("schema up to date"), again
