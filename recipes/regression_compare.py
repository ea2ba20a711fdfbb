"""Compare the metrics.jsonl files of two runs of recipes/regression-runs.sh, line by line, timings left out.

    python recipes/regression_compare.py runs/regression-before runs/regression-after
Exit status 1 when a number differs (beyond 1e-9 relative), 0 when every objective gives the same numbers.
"""
import json
import math
import sys
from pathlib import Path

TIMING = ("seconds", "_per_s", "time", "elapsed")


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(a: str, b: str) -> int:
    differ = 0
    for run in ("caption", "scst", "vqa", "joint", "distill"):
        fa, fb = Path(a, run, "metrics.jsonl"), Path(b, run, "metrics.jsonl")
        if not (fa.is_file() and fb.is_file()):
            print(f"{run}: missing in {'first' if not fa.is_file() else 'second'} run")
            differ += 1
            continue
        ra, rb = rows(fa), rows(fb)
        same, added = len(ra) == len(rb), set()
        for i, (x, y) in enumerate(zip(ra, rb)):
            for k in sorted(set(x) | set(y)):
                if any(t in k for t in TIMING):
                    continue
                if k not in x:  # a metric the first run did not record: an addition, not a change
                    added.add(k)
                    continue
                u, v = x.get(k), y.get(k)
                close = (isinstance(u, (int, float)) and isinstance(v, (int, float))
                         and math.isclose(u, v, rel_tol=1e-9, abs_tol=1e-12))
                if u != v and not close:
                    print(f"{run} epoch {i}: {k}: {u!r} -> {v!r}")
                    same = False
        extra = f"; added in the second: {', '.join(sorted(added))}" if added else ""
        print(f"{run}: {'same numbers' if same else 'DIFFERENT'} ({len(ra)} vs {len(rb)} epochs){extra}")
        differ += not same
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
