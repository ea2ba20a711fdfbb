"""What to caption: expand command-line inputs (files, folders, globs, @lists, datasets) into one ordered list.

The order is deterministic, so ``--shard i/n`` and torchrun ranks agree on who captions what without talking:
arguments are taken in the order given; each folder is walked recursively and each glob expanded in sorted
order; a path that appears twice (in any spelling) is kept at its first position.
"""
from __future__ import annotations

import glob
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_GLOB_CHARS = re.compile(r"[*?\[]")
# 000000000139.jpg (COCO 2017) and COCO_val2014_000000000139.jpg (COCO 2014) carry their COCO image id
_COCO_STEM = re.compile(r"(?:COCO_[A-Za-z]+\d*_)?(\d+)")


class InputError(ValueError):
    """A command-line input that cannot be used at all (e.g. an unreadable @list file)."""


@dataclass
class Item:
    path: str  # as the user spelled it (relative inputs stay relative), or absolute for datasets
    image_id: int | str | None = None  # dataset id, or the number in a COCO-style file name

    @property
    def name(self) -> str:
        """The path as records, logs and JSON show it: a file name that is not valid UTF-8 (Python holds its bytes
        as lone surrogates, which no UTF-8 file can store) with those bytes escaped, e.g. ``b\\xff.jpg``."""
        return printable_path(self.path)

    @property
    def has_printable_name(self) -> bool:
        return self.name == self.path

    @property
    def key(self) -> str:
        """Identity for de-duplication and resume: the absolute, normalised path (as records hold it)."""
        return path_key(self.name)


def printable_path(path: str) -> str:
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def path_key(path: str) -> str:
    return os.path.abspath(path)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def walk_images(folder: str) -> list[str]:
    """Image files under ``folder``, recursively, in sorted order; hidden files and folders are skipped
    (macOS ``._x.jpg`` resource forks, ``.thumbnails`` caches). Symlinked folders are not followed (no cycles)."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [os.path.join(root, f) for f in files if not f.startswith(".") and is_image_name(f)]
    return sorted(out, key=lambda p: p.split(os.sep))  # by path components: a/b/x.jpg, a/c.jpg (os.walk order varies)


def read_list_file(list_path: str) -> list[str]:
    """``@list.txt``: one path per line; blank lines and lines starting with '#' are skipped. Relative paths are
    relative to the current directory, like any other argument (the usual meaning of ``@file`` arguments)."""
    try:
        with open(list_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise InputError(f"list file {list_path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"list file {list_path}: cannot read ({e})") from None
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]


def expand_inputs(inputs: Sequence[str], warn=print) -> list[Item]:
    """INPUT arguments -> ordered, de-duplicated items.

    - an existing folder: its image files (by extension, case-insensitive), recursively, sorted;
    - an existing file, or a path that exists nowhere and has no glob characters: taken as given, whatever its
      extension, so a missing or non-image file becomes an error record instead of being silently dropped;
    - a glob pattern (``*``, ``?``, ``[``; ``**`` recurses): its matches in sorted order, each treated as above;
    - ``@list.txt``: each line is a file path, taken as given (a folder there is walked as above).
    ``warn`` receives messages about folders without images and patterns that match nothing.
    """
    paths: list[str] = []
    for arg in inputs:
        if arg.startswith("@") and len(arg) > 1 and not os.path.exists(arg):
            for line in read_list_file(arg[1:]):
                paths += walk_images(line) if os.path.isdir(line) else [line]
        elif os.path.isdir(arg):
            found = walk_images(arg)
            if not found:
                warn(f"warning: folder {arg} holds no image files "
                     f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, recursively)")
            paths += found
        elif os.path.exists(arg) or not _GLOB_CHARS.search(arg):
            paths.append(arg)
        else:
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                warn(f"warning: pattern {arg} matched no files")
            for m in matches:
                paths += walk_images(m) if os.path.isdir(m) else [m]
    return dedupe([Item(p) for p in paths])


def missing_folders(inputs: Sequence[str]) -> list[str]:
    """Arguments that exist nowhere, are no glob pattern and have no image extension: a mistyped folder, which is
    a usage error (exit 2, nothing written) where a missing photo.jpg becomes an error record like any unreadable
    image."""
    return [a for a in inputs if not a.startswith("@") and not os.path.exists(a) and not _GLOB_CHARS.search(a)
            and not is_image_name(a)]


def dedupe(items: Sequence[Item]) -> list[Item]:
    seen: set[str] = set()
    out = []
    for it in items:
        if it.key not in seen:
            seen.add(it.key)
            out.append(it)
    return out


def assign_image_ids(items: list[Item]) -> None:
    """Give items without an id the COCO image id in their file name (000000000139.jpg -> 139) when that
    number is unique in the whole list; others keep None and are identified by their path."""
    found = {}
    for i, it in enumerate(items):
        if it.image_id is None:
            m = _COCO_STEM.fullmatch(Path(it.path).stem)
            if m:
                found[i] = int(m.group(1))
    counts = Counter(found.values())
    for i, n in found.items():
        if counts[n] == 1:
            items[i].image_id = n


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text}: need n >= 1 and 0 <= i < n")
    return i, n


def shard(items: Sequence[Item], index: int, count: int) -> list[tuple[int, Item]]:
    """(position in the full list, item) for the ``index``-th of ``count`` shards: every count-th item.

    Round-robin rather than contiguous blocks, so folders sorted by date or size spread evenly over the ranks.
    """
    return [(pos, items[pos]) for pos in range(index, len(items), count)]
