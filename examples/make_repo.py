"""Create a small example git repository for the development workflow (stdlib only).

Usage: ``python examples/make_repo.py DIR``. Creates DIR with one commit on branch ``main``
(README, pytest configuration, one smoke test), or, if DIR is already a git repository,
leaves it alone and says so. Works on machines without a git identity configured.
Exit status 1 means DIR exists but is not an empty directory or a git repository.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# The identity is given per command so it works without a global git configuration.
GIT_IDENTITY = [
    "-c", "user.name=workflow-example",
    "-c", "user.email=workflow-example@localhost",
    "-c", "commit.gpgsign=false",
]  # fmt: skip

FILES = {
    "README.md": (
        "# Example project\n\n"
        "A small repository that the development workflow adds features to.\n"
        "Run the tests with `python -m pytest`.\n"
    ),
    # pythonpath = . lets tests import modules written at the repository root.
    "pytest.ini": "[pytest]\ntestpaths = tests\npythonpath = .\naddopts = -p no:cacheprovider\n",
    ".gitignore": "__pycache__/\n*.pyc\n.pytest_cache/\n",
    "tests/test_smoke.py": (
        "from pathlib import Path\n\n\n"
        "def test_readme_exists():\n"
        '    assert Path(__file__).parent.parent.joinpath("README.md").is_file()\n'
    ),
}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: make_repo.py DIR", file=sys.stderr)
        return 2
    target = Path(argv[1]).resolve()
    if (target / ".git").exists():
        print(f"make_repo: {target} is already a git repository; left unchanged")
        return 0
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        print(f"make_repo: {target} exists and is not an empty directory", file=sys.stderr)
        return 1
    create(target)
    print(f"make_repo: created {target} with an initial commit on branch main")
    return 0


def create(target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name, content in FILES.items():
        path = target / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    git(target, "init", "--quiet")
    # symbolic-ref rather than init -b: also works with git older than 2.28.
    git(target, "symbolic-ref", "HEAD", "refs/heads/main")
    git(target, "add", "--all")
    git(target, *GIT_IDENTITY, "commit", "--quiet", "-m", "Initial commit")


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
