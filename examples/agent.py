"""A deterministic stand-in for an AI coding agent, for demos and tests (stdlib only).

Usage: ``python examples/agent.py PROMPT_FILE``, run with the git worktree as the current
directory. It reads the prompt's ``# Title`` and ``Requirements`` bullets, then writes

- ``<slug_underscored>.py``: a real module (known implementations for the example prompts,
  otherwise one documented function per requirement), and
- ``tests/test_<slug_underscored>.py``: pytest tests of that module's behaviour.

It prints one line per file it writes (the workflow reads each line as a heartbeat) and is
idempotent: running it twice writes the same bytes. Exit status 2 means a bad prompt.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from pathlib import Path

KNOWN_MODULES: dict[str, tuple[str, str]] = {}  # slug -> (module source, test source)

KNOWN_MODULES["add-retry-helper"] = (
    '''"""Retry a flaky call a bounded number of times, with growing delays."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def backoff_delays(base: float, factor: float, count: int) -> list[float]:
    """``count`` delays: base, base * factor, base * factor**2, ..."""
    return [base * factor**i for i in range(count)]


def retry(
    func: Callable[[], T],
    attempts: int = 3,
    delay: float = 0.0,
    exceptions: tuple[type[BaseException], ...] = (Exception,),
) -> T:
    """Call ``func`` until it returns, at most ``attempts`` times; re-raise the last error."""
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    delays = backoff_delays(delay, 2.0, attempts - 1)
    for attempt in range(attempts):
        try:
            return func()
        except exceptions:
            if attempt == attempts - 1:
                raise
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")
''',
    '''from __future__ import annotations

import pytest

from add_retry_helper import backoff_delays, retry


def test_backoff_delays_grow_geometrically():
    assert backoff_delays(1.0, 2.0, 3) == [1.0, 2.0, 4.0]


def test_retry_returns_after_transient_failures():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("blip")
        return "ok"

    assert retry(flaky, attempts=3) == "ok"
    assert len(calls) == 3


def test_retry_reraises_the_last_error():
    def broken():
        raise ValueError("always")

    with pytest.raises(ValueError, match="always"):
        retry(broken, attempts=2)


def test_retry_does_not_retry_other_exceptions():
    calls = []

    def wrong():
        calls.append(1)
        raise KeyError("nope")

    with pytest.raises(KeyError):
        retry(wrong, attempts=5, exceptions=(ValueError,))
    assert len(calls) == 1


def test_retry_refuses_zero_attempts():
    with pytest.raises(ValueError):
        retry(lambda: None, attempts=0)
''',
)

KNOWN_MODULES["slugify-utility"] = (
    '''"""Turn free-form titles into safe, consistent slugs."""

from __future__ import annotations

import re
import unicodedata

_SLUG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def slugify(text: str, max_length: int = 50) -> str:
    """``text`` as lowercase ASCII words joined by hyphens, at most ``max_length`` long."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", folded.lower()).strip("-")
    slug = slug[:max_length].rstrip("-")
    return slug or "untitled"


def is_slug(text: str) -> bool:
    """True exactly for strings ``slugify`` could return."""
    return _SLUG.fullmatch(text) is not None
''',
    '''from __future__ import annotations

from slugify_utility import is_slug, slugify


def test_punctuation_becomes_single_hyphens():
    assert slugify("Hello, World!") == "hello-world"


def test_accents_are_folded():
    assert slugify("Crème brûlée") == "creme-brulee"


def test_length_is_bounded_without_trailing_hyphen():
    slug = slugify("alpha beta gamma", max_length=11)
    assert slug == "alpha-beta"
    assert len(slug) <= 11


def test_text_without_letters_gives_untitled():
    assert slugify("!!!") == "untitled"


def test_slugify_output_is_a_slug():
    for title in ["Hello, World!", "  spaced  out ", "Ünïcödé 123", "???"]:
        assert is_slug(slugify(title))
    assert not is_slug("Not A Slug")
    assert not is_slug("trailing-")
''',
)

KNOWN_MODULES["word-frequency"] = (
    '''"""Count words in a text and report the most frequent ones."""

from __future__ import annotations

import re
from collections import Counter

_WORD = re.compile(r"(?:[^\\W_]|')+")  # letters, digits, apostrophes


def word_counts(text: str) -> dict[str, int]:
    """How often each word occurs in ``text``, case-insensitively, in first-seen order."""
    return dict(Counter(word.lower() for word in _WORD.findall(text)))


def top_words(text: str, n: int) -> list[tuple[str, int]]:
    """The ``n`` most frequent words, most frequent first, ties broken alphabetically."""
    if n <= 0:
        return []
    ranked = sorted(word_counts(text).items(), key=lambda item: (-item[1], item[0]))
    return ranked[:n]
''',
    '''from __future__ import annotations

from word_frequency import top_words, word_counts


def test_counts_are_case_insensitive():
    assert word_counts("The cat and the hat") == {"the": 2, "cat": 1, "and": 1, "hat": 1}


def test_top_words_breaks_ties_alphabetically():
    assert top_words("b a b a c", 2) == [("a", 2), ("b", 2)]


def test_top_words_of_nothing_is_empty():
    assert top_words("", 3) == []
    assert top_words("some words", 0) == []
''',
)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: agent.py PROMPT_FILE", file=sys.stderr)
        return 2
    try:
        text = Path(argv[1]).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        print(f"agent: cannot read prompt {argv[1]}: {error}", file=sys.stderr)
        return 2
    title, requirements = parse_prompt(text)
    if title is None or not requirements:
        print(f"agent: {argv[1]} needs a '# Title' and a Requirements list", file=sys.stderr)
        return 2
    slug = slugify(title)
    module = module_name(slug)
    print(f"agent: implementing {title!r} ({len(requirements)} requirements)", flush=True)
    source, tests = KNOWN_MODULES.get(slug) or generic_module(module, requirements)
    write(Path(f"{module}.py"), source)
    write(Path("tests") / f"test_{module}.py", tests)
    print("agent: done", flush=True)
    return 0


def parse_prompt(text: str) -> tuple[str | None, list[str]]:
    """The first ``# `` heading and the bullets under headings that mention requirements."""
    title: str | None = None
    requirements: list[str] = []
    in_requirements = in_fence = False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        heading = None if in_fence else re.match(r"^(#{1,6})\s+(.*\S)", line)
        if heading:
            if heading.group(1) == "#" and title is None:
                title = heading.group(2).strip("# ")
            lowered = heading.group(2).lower()
            in_requirements = "requirement" in lowered and "success" not in lowered
            continue
        bullet = re.match(r"^\s*(?:[-*+]|\d+[.)])\s+(.*\S)", line)
        if in_requirements and bullet:
            requirements.append(bullet.group(1))
        elif in_requirements and requirements and line.startswith(" ") and line.strip():
            requirements[-1] += " " + line.strip()
    return title, requirements


def slugify(title: str) -> str:
    folded = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", folded.lower()).strip("-")[:40].rstrip("-")
    return slug or "feature"


def module_name(slug: str) -> str:
    name = slug.replace("-", "_")
    return name if name[0].isalpha() else f"feature_{name}"


def generic_module(module: str, requirements: list[str]) -> tuple[str, str]:
    """One documented function per requirement, returning the requirement's text."""
    source = ['"""Generated for the prompt: one function per requirement."""\n']
    tests = ["from __future__ import annotations\n", f"import {module}\n"]
    for number, requirement in enumerate(requirements, start=1):
        source.append(
            f"\ndef requirement_{number}() -> str:\n"
            f'    """Requirement {number}: {_docstring_safe(requirement)}"""\n'
            f"    return {requirement!r}\n"
        )
        tests.append(
            f"\ndef test_requirement_{number}_is_implemented():\n"
            f"    assert {module}.requirement_{number}() == {requirement!r}\n"
        )
    return "\n".join(source), "\n".join(tests)


def _docstring_safe(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def write(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    unchanged = path.exists() and path.read_text(encoding="utf-8") == content
    if not unchanged:
        path.write_text(content, encoding="utf-8")
    print(f"agent: {'unchanged' if unchanged else 'wrote'} {path}", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
