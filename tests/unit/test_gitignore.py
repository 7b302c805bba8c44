"""Secrets stay out of git (issue 9, item 8): the compose file and the settings read ``.env``,
where users put passwords and keys, so git must ignore it (its variants too, but not the
checked-in example)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def ignored(path: str) -> bool:
    done = subprocess.run(
        ["git", "check-ignore", "--quiet", "--no-index", path], cwd=ROOT, capture_output=True, check=False
    )
    if done.returncode not in (0, 1):
        pytest.fail(f"git check-ignore failed: {done.stderr.decode()}")
    return done.returncode == 0


@pytest.fixture(autouse=True)
def _in_a_git_tree() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (git check-ignore needs one)")


@pytest.mark.parametrize("path", [".env", ".env.local", ".env.production", "deploy/.env", "infra/.env.prod"])
def test_env_files_are_ignored(path: str) -> None:
    assert ignored(path), f"{path} is not ignored by .gitignore: it would hold secrets"


@pytest.mark.parametrize("path", [".env.example", "docs/operations.md", "docker-compose.yml"])
def test_the_example_and_the_project_are_not_ignored(path: str) -> None:
    assert not ignored(path)
