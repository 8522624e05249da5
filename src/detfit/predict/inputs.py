"""What ``detfit predict`` is given, as a stream: image files, folders (recursive), globs and
videos. Problems with one input are reported in one line and the others still run."""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from detfit.data.images import IMAGE_SUFFIXES

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}
GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Item:
    """One image or video to predict, and the name its outputs get (no suffix)."""

    path: Path
    name: str
    video: bool = False


def _named(paths: list[Path], base: Path | None) -> list[tuple[Path, str]]:
    out = []
    for p in paths:
        rel = p.relative_to(base) if base is not None else Path(p.name)
        out.append((p, str(rel.with_suffix(""))))
    return out


def expand(inputs: Sequence[str | Path], problems: list[str]) -> Iterator[Item]:
    """Items in the given order (folders and globs sorted); unusable inputs go to ``problems``."""
    used: set[str] = set()
    for raw in inputs:
        text = str(raw)
        path = Path(text)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                problems.append(f"{path}: no images in this folder (recursive: {_suffixes()})")
            named = _named(found, path)
        elif path.is_file():
            named = _named([path], None)
        elif GLOB_CHARS & set(text):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            found = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES]
            if not found:
                problems.append(f"{text}: no image or video matches this pattern")
            named = _named(found, None)
        else:
            problems.append(f"{path}: not found")
            named = []
        for p, name in named:
            unique, n = name, 1
            while unique in used:
                n += 1
                unique = f"{name}-{n}"
            used.add(unique)
            yield Item(p, unique, p.suffix.lower() in VIDEO_SUFFIXES)


def _suffixes() -> str:
    return " ".join(sorted(IMAGE_SUFFIXES))
