"""The package layout the README describes: the library at the bottom, the applications above it."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_the_library_imports_neither_training_nor_service_nor_the_cli():
    library = [p for p in (ROOT / "captioner").glob("*.py") if p.name != "__main__.py"]  # __main__: `python -m`
    assert len(library) >= 10
    for path in library:
        for name in imported_modules(path):
            top = name.split(".")[0]
            assert top not in ("training", "service") and not name.startswith("captioner.cli"), (path.name, name)
        text = path.read_text()
        assert "from .cli" not in text and "from . import cli" not in text, path.name


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["train", "--task", "vqa", "--help"],
                                  ["evaluate", "--task", "vqa", "--help"], ["distill", "--help"],
                                  ["caption", "--help"], ["ask", "--help"], ["serve", "--help"], ["export", "--help"],
                                  ["merge", "--help"]])
def test_help_never_imports_torch(argv):
    code = ("import sys\nfrom captioner.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')" % (argv,))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().endswith("NO-TORCH"), r.stdout[-500:] + r.stderr[-500:]
    assert "usage: captioner" in r.stdout


def test_the_distill_teacher_option_names_a_known_teacher():
    from captioner.cli import parsers
    from training.distill import TEACHERS

    assert parsers.distill().get_default("teacher") in TEACHERS


def test_one_epoch_loop_for_every_training_objective():
    """The epoch loop, optimizer step, schedule, resume and saving rhythm live in training/engine.py; the
    objectives (train.py, train_vqa.py, distill.py) only supply batches, losses, evaluation and saving."""
    loops = [p.name for p in (ROOT / "training").glob("*.py") if "for epoch in range(" in p.read_text()]
    assert loops == ["engine.py"], loops
    for name in ("train.py", "train_vqa.py", "distill.py"):
        text = (ROOT / "training" / name).read_text()
        assert "optimizer_step(" not in text and "LambdaLR(" not in text and "from .engine import" in text, name
