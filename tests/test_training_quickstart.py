"""The README's training quick start, run as written: a 5-epoch, 300-photo run that learns (CIDEr-D well above 0),
then its model captions photos with non-empty, not all identical captions."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def quickstart_commands() -> list[str]:
    """The shell commands of the README block after the <!-- quickstart --> marker (continuations joined)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- quickstart -->\s*```bash\n(.*?)```", text, re.S).group(1)
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def test_the_quickstart_block_is_there():
    cmds = quickstart_commands()
    assert len(cmds) == 2 and cmds[0].startswith("captioner train") and cmds[1].startswith("captioner caption")


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.skipif(not (DATA / "flickr8k" / "dataset_flickr8k.json").is_file(),
                    reason="needs ../shared/data (Flickr8k and coco-mini), which a fresh clone does not have")
def test_the_readme_training_quickstart_learns(tmp_path):
    train, caption = quickstart_commands()
    out = tmp_path / "smoke"
    argv = shlex.split(train.replace("runs/smoke", str(out)))
    proc = subprocess.run([sys.executable, "-m", "captioner", *argv[1:]], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and rows[-1]["lr"] < rows[0]["lr"]
    assert max(r["CIDEr-D"] for r in rows) > 0.03, rows  # it learned: scores are fractions here (13.6 shown x100)
    cmd = caption.split("|")[0].replace("runs/smoke", str(out))
    proc = subprocess.run([sys.executable, "-m", "captioner", *shlex.split(cmd)[1:]], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    captions = [json.loads(line)["captions"][0]["caption"] for line in proc.stdout.splitlines()]
    assert len(captions) == 208 and all(c.strip() for c in captions) and len(set(captions)) >= 2
