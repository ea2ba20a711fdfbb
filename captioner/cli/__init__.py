"""The ``captioner`` command and its applications: the command-line layer above the library.

    captioner/cli/__init__.py   main(): one entry point; picks the command (and for train/evaluate the --task)
    captioner/cli/parsers.py    every command's options, argparse only (`--help` never imports torch)
    captioner/cli/caption.py    the batch captioner (inputs.py: what to caption, writers.py: JSONL/COCO/HTML out),
                                its engines behind engine.py's interface: local_engine.py, ray_engine.py
    captioner/cli/ask.py, export.py, merge.py, serve.py

This package imports downward (the library in captioner/, training/, service/); nothing below imports it, as
torchvision keeps references/ beside its library. Training commands run training.train, training.distill, ...
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import parsers

# command -> what it does; (command, --task) -> (options, the module whose main(args) runs it)
COMMANDS = {
    "train": "train a caption model (--task vqa|joint: a VQA or joint model)",
    "distill": "teach the VGG-style encoder from an ImageNet network (no labels needed)",
    "label": "cache detected COCO objects and teacher features of photos (for distill and make-vqa)",
    "pseudo-refs": "give labelled photos captions from a text-only pool that name their detected objects",
    "evaluate": "caption a dataset split and compute COCO metrics (--task vqa: VQA accuracy)",
    "make-vqa": "write multiple-choice questions about photos from their captions (Visual7W format)",
    "ask": "answer a multiple-choice question about an image",
    "caption": "caption images, folders, lists or datasets",
    "merge": "join the part files of a sharded caption run",
    "export": "write a trained checkpoint as a compact fp16 model directory",
    "serve": "run the REST service (captions, VQA, web page) with dynamic batching",
}
RUNS = {
    ("train", "caption"): (parsers.train, "training.train"),
    ("train", "vqa"): (parsers.train_vqa, "training.train_vqa"),
    ("train", "joint"): (parsers.train_vqa, "training.train_vqa"),
    ("distill", None): (parsers.distill, "training.distill"),
    ("label", None): (parsers.label, "training.label"),
    ("pseudo-refs", None): (parsers.pseudo_refs, "training.pseudo_refs"),
    ("evaluate", "caption"): (parsers.evaluate, "training.evaluate"),
    ("evaluate", "vqa"): (parsers.evaluate_vqa, "training.evaluate_vqa"),
    ("make-vqa", None): (parsers.make_vqa, "training.make_vqa"),
    ("ask", None): (parsers.ask, "captioner.cli.ask"),
    ("caption", None): (parsers.caption, "captioner.cli.caption"),
    ("merge", None): (parsers.merge, "captioner.cli.merge"),
    ("export", None): (parsers.export, "captioner.cli.export"),
    ("serve", None): (parsers.serve, "captioner.cli.serve"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        print(f"captioner {_version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        p = parsers.Parser("captioner", description="Image captioning: train, evaluate, caption. Errors in "
                                    "your input print one line; add --debug to any command for the traceback.")
        p.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v}" for k, v in COMMANDS.items()))
        p.add_argument("-V", "--version", action="store_true", help="print the version and exit")
        p.parse_args(argv[:1])  # prints help or the error and exits
        return 2
    command, rest = argv[0], argv[1:]
    debug = "--debug" in rest
    rest = [a for a in rest if a != "--debug"]
    parser, module = _pick(command, rest)
    args = parser().parse_args(rest)
    try:
        result = importlib.import_module(module).main(args)
    except _expected_errors() as e:
        if debug:
            raise
        # what the user can fix (a missing file, a damaged checkpoint, a dataset in another format): one line
        print(f"captioner {command}: error: {_one_line(e)}\n(run with --debug for the traceback)", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("captioner")
    except Exception:  # noqa: BLE001 - a source tree that is not installed
        return "unknown (not installed)"


def _pick(command: str, argv: list[str]):
    """The command's options and module; train and evaluate have one of each per --task (an ordinary option that
    every one of their parsers declares)."""
    if (command, None) in RUNS:
        return RUNS[command, None]
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--task", default="caption")
    task = peek.parse_known_args(argv)[0].task
    if (command, task) not in RUNS:
        known = [t for c, t in RUNS if c == command]
        raise SystemExit(f"captioner {command}: --task must be one of {', '.join(known)}, got {task!r}")
    return RUNS[command, task]


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors about the user's input, as opposed to bugs: these print one line, others a traceback."""
    errors: list[type[BaseException]] = [FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError]
    for module, name in (("captioner.checkpoint", "CheckpointError"), ("captioner.preprocess", "ImageError"),
                         ("captioner.generation", "GenerationConfigError"),
                         ("training.datasets", "DatasetError"), ("captioner.vqa", "VQAInputError"),
                         ("captioner.vqa", "VQAUnavailableError")):
        cls = getattr(sys.modules.get(module), name, None)  # only modules the command loaded can raise them
        if cls is not None:
            errors.append(cls)
    return tuple(errors)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
