"""Prompt files: the Markdown description of one feature that starts a development workflow.

``load_prompt`` turns a file into a ``Prompt`` or raises one ``ConfigurationError`` whose
message names the file and the problem. It never reads more than ``MAX_PROMPT_BYTES``, and it
never opens anything but a regular file (a FIFO or a device would block or never end).
"""

from __future__ import annotations

import os
import re
import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anyio.to_thread

from reliability._errors import ConfigurationError

__all__ = ["MAX_PROMPT_BYTES", "Complexity", "Prompt", "load_prompt", "load_prompt_async"]

MAX_PROMPT_BYTES = 1024 * 1024
"""Prompt files larger than this are refused before a byte of them is read."""

MAX_SLUG_LENGTH = 40

Complexity = Literal["low", "medium", "high"]
_COMPLEXITIES: frozenset[str] = frozenset({"low", "medium", "high"})

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^\s*(?:[-*+]|\d{1,9}[.)])\s+(.*\S)\s*$")
_CHECKBOX = re.compile(r"^\[[ xX]\]\s+")
_FENCE = re.compile(r"^\s*(```|~~~)")


@dataclass(frozen=True, slots=True)
class Prompt:
    """One parsed prompt file.

    ``title`` is the text of the first level-1 heading; ``slug`` is derived from it
    (lowercase ASCII letters, digits and hyphens, 1 to 40 characters, never empty).
    ``sections`` maps each lower-level heading to the text under it, in file order.
    ``requirements`` is never empty; ``success_criteria`` may be.
    """

    path: Path
    title: str
    slug: str
    sections: dict[str, str] = field(hash=False)
    requirements: tuple[str, ...]
    success_criteria: tuple[str, ...]
    complexity: Complexity
    text: str

    def __post_init__(self) -> None:
        if not self.requirements:
            raise ConfigurationError(f"{self.path}: a prompt needs at least one requirement")
        if self.complexity not in _COMPLEXITIES:
            raise ConfigurationError(
                f"{self.path}: complexity {self.complexity!r} is not one of low, medium, high"
            )
        too_long = len(self.slug) > MAX_SLUG_LENGTH
        if too_long or not re.fullmatch(r"[a-z0-9]+(?:-[a-z0-9]+)*", self.slug):
            raise ConfigurationError(f"{self.path}: slug {self.slug!r} is not a valid slug")


def load_prompt(path: Path) -> Prompt:
    """Read and parse the prompt file at ``path`` (blocking; see ``load_prompt_async``).

    Raises ``ConfigurationError`` naming the file if it is missing, not a regular file
    (symlinks are followed first), unreadable, larger than ``MAX_PROMPT_BYTES``, binary,
    not UTF-8, empty, without a ``# Title`` or without a requirements list.
    """
    text = _decode(path, _read_bounded(path))
    if not text.strip():
        raise ConfigurationError(f"{path}: the prompt file is empty")
    return parse_prompt(path, text)


async def load_prompt_async(path: Path) -> Prompt:
    """``load_prompt`` in a worker thread, so file I/O never blocks the event loop."""
    return await anyio.to_thread.run_sync(load_prompt, path)


def parse_prompt(path: Path, text: str) -> Prompt:
    """Parse prompt ``text`` (already read from ``path``, which is only used in messages)."""
    title, sections, requirements, criteria = _parse_markdown(text)
    if title is None:
        raise ConfigurationError(
            f"{path}: no title; the prompt must contain a level-1 heading such as '# Add X'"
        )
    if not requirements:
        raise ConfigurationError(
            f"{path}: no requirements; add a heading containing 'Requirements' followed by "
            "a bullet list ('- ...', '* ...' or '1. ...')"
        )
    return Prompt(
        path=path,
        title=title,
        slug=slugify(title),
        sections=sections,
        requirements=tuple(requirements),
        success_criteria=tuple(criteria),
        complexity=estimate_complexity(len(requirements), len(text.split())),
        text=text,
    )


def slugify(title: str) -> str:
    """``title`` as lowercase ASCII words joined by hyphens, at most 40 characters.

    Accents are folded (``é`` -> ``e``); anything else non-alphanumeric separates words.
    A title with no usable character gives ``"feature"``.
    """
    ascii_title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_title.lower()).strip("-")
    slug = slug[:MAX_SLUG_LENGTH].rstrip("-")
    return slug or "feature"


def estimate_complexity(requirement_count: int, word_count: int) -> Complexity:
    """A rough size class: many requirements or a long text mean more work for the agent."""
    if requirement_count >= 8 or word_count >= 1200:
        return "high"
    if requirement_count >= 4 or word_count >= 400:
        return "medium"
    return "low"


def _read_bounded(path: Path) -> bytes:
    """The bytes of ``path``, checked to be a small regular file before anything is read."""
    _check_regular_file(path, _stat(path))
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO after the check, open must not hang.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except PermissionError as error:
        raise ConfigurationError(f"{path}: the prompt file is not readable ({error})") from error
    except OSError as error:
        raise ConfigurationError(f"{path}: cannot open the prompt file ({error})") from error
    with os.fdopen(fd, "rb") as file:
        # Checked again on the open descriptor: the path may have changed since the stat.
        _check_regular_file(path, os.fstat(file.fileno()))
        try:
            data = file.read(MAX_PROMPT_BYTES + 1)
        except OSError as error:
            raise ConfigurationError(f"{path}: cannot read the prompt file ({error})") from error
    if len(data) > MAX_PROMPT_BYTES:
        raise _too_large(path, len(data))
    return data


def _stat(path: Path) -> os.stat_result:
    try:
        return os.stat(path)  # follows symlinks: the target is what gets read
    except FileNotFoundError as error:
        raise ConfigurationError(f"{path}: the prompt file does not exist") from error
    except PermissionError as error:
        raise ConfigurationError(f"{path}: the prompt file is not accessible ({error})") from error
    except OSError as error:
        raise ConfigurationError(f"{path}: cannot examine the prompt file ({error})") from error


def _check_regular_file(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise ConfigurationError(
            f"{path}: the prompt must be a regular file, but this is {_file_kind(info.st_mode)}"
        )
    if info.st_size > MAX_PROMPT_BYTES:
        raise _too_large(path, info.st_size)


def _too_large(path: Path, size: int) -> ConfigurationError:
    return ConfigurationError(
        f"{path}: the prompt file is {size} bytes, more than the limit of {MAX_PROMPT_BYTES} "
        "bytes; shorten it"
    )


def _file_kind(mode: int) -> str:
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _decode(path: Path, data: bytes) -> str:
    if b"\0" in data:
        raise ConfigurationError(f"{path}: the prompt file is binary (it contains NUL bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigurationError(
            f"{path}: the prompt file is not valid UTF-8 (byte {error.start}); save it as UTF-8"
        ) from error
    return text.removeprefix("\ufeff")


def _parse_markdown(
    text: str,
) -> tuple[str | None, dict[str, str], list[str], list[str]]:
    """(title, sections, requirements, success criteria) of a Markdown text.

    Headings and bullets inside fenced code blocks are content, not structure.
    """
    title: str | None = None
    sections: dict[str, list[str]] = {}
    requirements: list[str] = []
    criteria: list[str] = []
    current: str | None = None
    target: list[str] | None = None  # the list that bullets under the current heading feed
    in_fence = False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        heading = None if in_fence else _HEADING.match(line)
        if heading is not None:
            level, name = len(heading.group(1)), heading.group(2).strip()
            if level == 1 and title is None and name:
                title, current, target = name, None, None
                continue
            current = name
            sections.setdefault(current, [])
            target = _bullet_target(name, requirements, criteria)
            continue
        if current is not None:
            sections[current].append(line)
        if target is not None and not in_fence:
            _collect_bullet(line, target)
    return title, {k: "\n".join(v).strip() for k, v in sections.items()}, requirements, criteria


def _bullet_target(heading: str, requirements: list[str], criteria: list[str]) -> list[str] | None:
    lowered = heading.lower()
    # Checked first so "Success criteria (requirements met)" feeds the criteria, not the
    # requirements: the agent must implement requirements, never the acceptance checks.
    if "success" in lowered or "criteria" in lowered:
        return criteria
    if "requirement" in lowered:
        return requirements
    return None


def _collect_bullet(line: str, target: list[str]) -> None:
    bullet = _BULLET.match(line)
    if bullet is not None:
        item = _CHECKBOX.sub("", bullet.group(1)).strip()
        if item:
            target.append(item)
    elif target and line.startswith((" ", "\t")) and line.strip():
        # An indented non-bullet line continues the previous item.
        target[-1] = f"{target[-1]} {line.strip()}"
