"""Prompt files: parsing, and one clear ConfigurationError per kind of bad file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from machines.development import _prompt
from machines.development._prompt import (
    MAX_PROMPT_BYTES,
    estimate_complexity,
    load_prompt,
    load_prompt_async,
    slugify,
)
from reliability._errors import ConfigurationError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "prompts"

GOOD = """# Add retry helper

## Overview

Retry flaky calls.

## Requirements

- Add `retry(func, attempts)`
  that calls func until it returns.
* Add `backoff_delays(base, factor, count)`
1. Raise ValueError for attempts < 1
2) Keep it dependency-free
- [ ] Document it

## Success Criteria

- A call failing twice then succeeding is made three times
- Tests pass
"""


def write(tmp_path: Path, text: str | bytes, name: str = "prompt.md") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def refusal(path: Path) -> str:
    with pytest.raises(ConfigurationError) as caught:
        load_prompt(path)
    assert str(path) in str(caught.value)
    return str(caught.value)


class TestParsing:
    def test_title_slug_sections_and_lists_are_parsed(self, tmp_path: Path) -> None:
        """Title, slug, sections, requirements and criteria come from the Markdown structure."""
        prompt = load_prompt(write(tmp_path, GOOD))
        assert prompt.title == "Add retry helper"
        assert prompt.slug == "add-retry-helper"
        assert list(prompt.sections) == ["Overview", "Requirements", "Success Criteria"]
        assert prompt.sections["Overview"] == "Retry flaky calls."
        assert prompt.requirements == (
            "Add `retry(func, attempts)` that calls func until it returns.",
            "Add `backoff_delays(base, factor, count)`",
            "Raise ValueError for attempts < 1",
            "Keep it dependency-free",
            "Document it",
        )
        assert prompt.success_criteria == (
            "A call failing twice then succeeding is made three times",
            "Tests pass",
        )
        assert prompt.text == GOOD
        assert prompt.path == tmp_path / "prompt.md"

    def test_headings_and_bullets_inside_code_fences_are_content(self, tmp_path: Path) -> None:
        """A '# comment' or '- item' inside a fenced code block is neither title nor bullet."""
        text = (
            "```python\n# not the title\n```\n# Real title\n## Requirements\n- one\n"
            "```\n- not a requirement\n## Not a heading\n```\n- two\n"
        )
        prompt = load_prompt(write(tmp_path, text))
        assert prompt.title == "Real title"
        assert prompt.requirements == ("one", "two")
        assert "## Not a heading" in prompt.sections["Requirements"]

    def test_criteria_heading_with_requirement_word_feeds_criteria(self, tmp_path: Path) -> None:
        """A heading naming success criteria never adds to the requirements."""
        text = "# T\n## Functional requirements\n- a\n## Success criteria (requirements met)\n- b\n"
        prompt = load_prompt(write(tmp_path, text))
        assert prompt.requirements == ("a",)
        assert prompt.success_criteria == ("b",)

    def test_utf8_bom_and_crlf_are_accepted(self, tmp_path: Path) -> None:
        """A BOM and Windows line endings do not hide the title or the bullets."""
        raw = "\ufeff# Café\r\n## Requirements\r\n- do it\r\n".encode()
        prompt = load_prompt(write(tmp_path, raw))
        assert prompt.title == "Café"
        assert prompt.slug == "cafe"
        assert prompt.requirements == ("do it",)

    def test_symlink_to_a_prompt_is_followed(self, tmp_path: Path) -> None:
        """A symlink is resolved and its target read."""
        target = write(tmp_path, GOOD)
        link = tmp_path / "link.md"
        link.symlink_to(target)
        assert load_prompt(link).title == "Add retry helper"

    @pytest.mark.parametrize("name", ["add-retry-helper", "slugify-utility", "word-frequency"])
    def test_example_prompts_load(self, name: str) -> None:
        """The shipped example prompts are valid, with requirements and success criteria."""
        prompt = load_prompt(EXAMPLES / f"{name}.md")
        assert prompt.slug == name
        assert len(prompt.requirements) >= 3
        assert prompt.success_criteria
        assert "Overview" in prompt.sections

    async def test_async_loader_gives_the_same_prompt(self, tmp_path: Path) -> None:
        """load_prompt_async returns what load_prompt returns."""
        path = write(tmp_path, GOOD)
        assert await load_prompt_async(path) == load_prompt(path)


class TestSlugAndComplexity:
    @pytest.mark.parametrize(
        ("title", "slug"),
        [
            ("Add a Retry Helper!", "add-a-retry-helper"),
            ("Crème brûlée  --  v2", "creme-brulee-v2"),
            ("日本語", "feature"),
            ("!!!", "feature"),
        ],
    )
    def test_slug_is_lowercase_ascii_with_hyphens(self, title: str, slug: str) -> None:
        """Slugs fold accents, join words with single hyphens and fall back to 'feature'."""
        assert slugify(title) == slug

    def test_long_slug_is_cut_to_40_without_trailing_hyphen(self) -> None:
        """A long title gives at most 40 characters, never ending in a hyphen."""
        slug = slugify("word " * 20)
        assert len(slug) <= 40
        assert slug == "-".join(["word"] * 8)

    def test_complexity_grows_with_requirements_and_words(self) -> None:
        """Few short requirements are low; many requirements or long texts are high."""
        assert estimate_complexity(2, 100) == "low"
        assert estimate_complexity(5, 100) == "medium"
        assert estimate_complexity(2, 500) == "medium"
        assert estimate_complexity(9, 100) == "high"
        assert estimate_complexity(1, 5000) == "high"


class TestRefusals:
    def test_missing_file(self, tmp_path: Path) -> None:
        """A path that does not exist is refused, naming the file."""
        assert "does not exist" in refusal(tmp_path / "nope.md")

    def test_dangling_symlink(self, tmp_path: Path) -> None:
        """A symlink to nothing is a missing file."""
        link = tmp_path / "dangling.md"
        link.symlink_to(tmp_path / "gone.md")
        assert "does not exist" in refusal(link)

    def test_directory(self, tmp_path: Path) -> None:
        """A directory is not a prompt."""
        assert "directory" in refusal(tmp_path)

    def test_symlink_to_directory(self, tmp_path: Path) -> None:
        """A symlink is resolved before the regular-file check."""
        link = tmp_path / "dir-link.md"
        link.symlink_to(tmp_path)
        assert "directory" in refusal(link)

    def test_fifo_is_refused_without_blocking(self, tmp_path: Path) -> None:
        """A named pipe is refused before it is opened (opening it would block)."""
        fifo = tmp_path / "pipe.md"
        os.mkfifo(fifo)
        assert "FIFO" in refusal(fifo)

    def test_character_device(self) -> None:
        """A device such as /dev/zero (endless) is refused."""
        assert "character device" in refusal(Path("/dev/zero"))

    @pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
    def test_unreadable_file(self, tmp_path: Path) -> None:
        """A file without read permission is refused."""
        path = write(tmp_path, GOOD)
        path.chmod(0)
        assert "not readable" in refusal(path)

    def test_huge_sparse_file_is_refused_without_reading(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A 50 MB file is refused on its size alone: it is never even opened."""
        path = tmp_path / "huge.md"
        with path.open("wb") as file:
            file.truncate(50 * 1024 * 1024)
        opened: list[str] = []
        real_open = os.open

        def spy(target: str | os.PathLike[str], *args: int) -> int:
            opened.append(os.fspath(target))
            return real_open(target, *args)

        monkeypatch.setattr(_prompt.os, "open", spy)
        message = refusal(path)
        assert "52428800 bytes" in message
        assert str(MAX_PROMPT_BYTES) in message
        assert opened == []

    def test_file_just_over_the_limit(self, tmp_path: Path) -> None:
        """One byte over MAX_PROMPT_BYTES is too large."""
        path = write(tmp_path, b"# T\n## Requirements\n- x\n" + b"a" * MAX_PROMPT_BYTES)
        assert "limit" in refusal(path)

    def test_binary_file(self, tmp_path: Path) -> None:
        """NUL bytes mark a binary file."""
        assert "binary" in refusal(write(tmp_path, b"# T\n\0\0\x01## Requirements\n- x\n"))

    def test_not_utf8(self, tmp_path: Path) -> None:
        """Latin-1 bytes that are not UTF-8 are refused with the byte offset."""
        message = refusal(write(tmp_path, "# Caf\xe9\n## Requirements\n- x\n".encode("latin-1")))
        assert "UTF-8" in message

    @pytest.mark.parametrize("text", ["", "   \n\t\n"])
    def test_empty_file(self, tmp_path: Path, text: str) -> None:
        """An empty or whitespace-only file is refused."""
        assert "empty" in refusal(write(tmp_path, text))

    def test_no_title(self, tmp_path: Path) -> None:
        """Without a level-1 heading there is no title."""
        assert "no title" in refusal(write(tmp_path, "## Requirements\n- x\n"))

    def test_no_requirements_heading(self, tmp_path: Path) -> None:
        """A prompt without a requirements section is refused."""
        assert "no requirements" in refusal(write(tmp_path, "# T\n\nJust prose.\n- a bullet\n"))

    def test_requirements_heading_without_bullets(self, tmp_path: Path) -> None:
        """A requirements section written as prose has no requirements."""
        text = "# T\n## Requirements\nPlease do everything.\n"
        assert "no requirements" in refusal(write(tmp_path, text))
