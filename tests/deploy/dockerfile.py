"""A small reader of our Dockerfile for the tests that check it without a Docker engine.

It understands what the file uses: stages (`FROM x AS name`), continuation lines, comments, and
instructions with their argument text. Not a general Dockerfile parser.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"


@dataclass
class Stage:
    name: str
    parent: str  # the image or stage it is built FROM
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)


def stages(path: Path = DOCKERFILE) -> dict[str, Stage]:
    """Stages by name, with their own instructions; continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", path.read_text())
    found: dict[str, Stage] = {}
    stage = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, args = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else words[0]
            stage = found[name] = Stage(name, words[0])
        elif stage is not None:
            stage.instructions.append((instruction.upper(), args.strip()))
    return found


def lineage(name: str, path: Path = DOCKERFILE) -> list[Stage]:
    """The stage and the stages it is built FROM, base first."""
    all_stages = stages(path)
    assert name in all_stages, f"{path} has no stage {name!r}; it has {sorted(all_stages)}"
    chain = [all_stages[name]]
    while chain[0].parent in all_stages:
        chain.insert(0, all_stages[chain[0].parent])
    return chain


def instructions(name: str, path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """A stage's instructions after those of the stages it is built FROM, in order."""
    return [i for stage in lineage(name, path) for i in stage.instructions]


def env(name: str, *, args: bool = False, path: Path = DOCKERFILE) -> dict[str, str]:
    """The stage's ENV as the container sees it; with args=True, ARG defaults too (RUN sees them)."""
    out: dict[str, str] = {}
    for instruction, text in instructions(name, path):
        if instruction == "ARG" and args:
            for key, _, value in (w.partition("=") for w in shlex.split(text)):
                out.setdefault(key, value)
        elif instruction == "ENV":
            words = shlex.split(text)
            if "=" in words[0]:
                out.update(w.split("=", 1) for w in words)
            else:  # the old `ENV KEY value` form
                out[words[0]] = " ".join(words[1:])
    return out


def last(name: str, instruction: str, path: Path = DOCKERFILE) -> str:
    """The arguments of the stage's last `instruction` (the one that counts, for USER or ENTRYPOINT)."""
    return [text for i, text in instructions(name, path) if i == instruction][-1]
