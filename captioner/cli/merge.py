"""``captioner merge``: join the part files of a sharded ``captioner caption`` run (``OUT.shard{i}-of-{n}.jsonl``)
into the final output, in input order, one record per image."""
from __future__ import annotations

import argparse
import glob
import re
import sys
from pathlib import Path

from .writers import format_for, in_input_order, iter_parts, write_output

_PART = re.compile(r"\.shard(\d+)-of-(\d+)\.jsonl$")


class MergeError(ValueError):
    pass


def find_parts(out: str) -> list[str]:
    """The complete set of part files beside ``out``, shard 0 first; MergeError if any is missing or the
    parts disagree on the number of shards."""
    found: dict[int, dict[int, str]] = {}
    for p in glob.glob(glob.escape(out) + ".shard*-of-*.jsonl"):
        m = _PART.search(p)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
    if not found:
        raise MergeError(f"no part files {out}.shard<i>-of-<n>.jsonl found")
    if len(found) > 1:
        raise MergeError(f"part files of different shard counts beside {out}: n = {sorted(found)}; "
                         "remove the stale ones or list the parts to merge explicitly")
    (n, parts), = found.items()
    missing = [i for i in range(n) if i not in parts]
    if missing:
        raise MergeError(f"{len(missing)} of {n} parts missing: " + ", ".join(f"{out}.shard{i}-of-{n}.jsonl"
                                                                             for i in missing[:5]))
    return [parts[i] for i in range(n)]


def merge_parts(out: str, fmt: str, parts: list[str] | None = None, title: str = "Captions", workers: int = 4,
                progress: bool = True) -> tuple[int, int]:
    """Write ``out`` from the parts (found beside it by default); returns (images, error records).

    Records are ordered by their input position; an image present in several parts is kept once.
    """
    parts = parts or find_parts(out)
    records = in_input_order(iter_parts(parts))
    write_output(out, fmt, records, title=title, workers=workers, progress=progress)
    return len(records), sum("error" in r for r in records)




def main(args: argparse.Namespace) -> int:
    try:
        fmt = format_for(args.out, args.format)
        for p in args.parts:
            if not Path(p).is_file():
                raise MergeError(f"part file {p}: no such file")
        n, n_err = merge_parts(args.out, fmt, args.parts or None, workers=args.workers, progress=not args.no_progress)
    except ValueError as e:  # MergeError, bad format
        print(f"captioner merge: error: {e}", file=sys.stderr)
        return 2
    print(f"merged {n} images ({n_err} failed) -> {args.out}", file=sys.stderr)
    return 0
