"""The ``captioner`` command: one entry point for training, evaluation, captioning, VQA and serving."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "train": ("training.train", "train a caption model (--task vqa|joint: a VQA or joint model)"),
        "distill": ("training.distill", "teach the VGG-style encoder from an ImageNet network (no labels needed)"),
        "evaluate": ("training.evaluate", "caption a dataset split and compute COCO metrics (--task vqa: VQA accuracy)"),
        "ask": ("captioner.ask_cli", "answer a multiple-choice question about an image"),
        "caption": ("captioner.caption_cli", "caption images, folders, lists or datasets"),
        "merge": ("captioner.merge", "join the part files of a sharded caption run"),
        "export": ("captioner.export_cli", "write a trained checkpoint as a compact fp16 model directory"),
        "serve": ("captioner.serve_cli", "run the REST service (captions, VQA, web page) with dynamic batching"),
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        p = argparse.ArgumentParser("captioner", description="Image captioning: train, evaluate, caption. Errors in "
                                    "your input print one line; add --debug to any command for the traceback.")
        p.add_argument("command", choices=sorted(commands), help="; ".join(f"{k}: {v[1]}" for k, v in commands.items()))
        p.parse_args(argv[:1])  # prints help or the error and exits
        return 2
    import importlib

    debug = "--debug" in argv[1:]
    argv = [a for a in argv if a != "--debug"]
    module, argv = _route_task(argv, commands[argv[0]][0])
    mod = importlib.import_module(module)
    args = mod.get_args_parser().parse_args(argv[1:])
    try:
        result = mod.main(args)
    except _expected_errors() as e:
        if debug:
            raise
        # what the user can fix (a missing file, a damaged checkpoint, a dataset in another format): one line
        print(f"captioner {argv[0]}: error: {_one_line(e)}\n(run with --debug for the traceback)", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default only when it has one and its help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors about the user's input, as opposed to bugs: these print one line, others a traceback."""
    from .checkpoint import CheckpointError
    from .preprocess import ImageError

    errors: list[type[BaseException]] = [CheckpointError, ImageError, FileNotFoundError, NotADirectoryError,
                                         IsADirectoryError, PermissionError]
    for module, name in (("training.datasets", "DatasetError"), ("captioner.vqa", "VQAInputError"),
                         ("captioner.vqa", "VQAUnavailableError")):
        cls = getattr(sys.modules.get(module), name, None)  # only modules the command loaded can raise them
        if cls is not None:
            errors.append(cls)
    return tuple(errors)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# `train`/`evaluate --task vqa|joint` go to the VQA modules; `--task caption` (the default) is dropped for the
# caption modules, which know no --task.
_TASK_MODULES = {("train", "vqa"): "training.train_vqa", ("train", "joint"): "training.train_vqa",
                 ("evaluate", "vqa"): "training.evaluate_vqa"}


def _route_task(argv: list[str], module: str) -> tuple[str, list[str]]:
    if argv[0] not in ("train", "evaluate"):
        return module, argv
    for i, a in enumerate(argv[1:], 1):
        if a == "--task" and i + 1 < len(argv):
            value, span = argv[i + 1], 2
        elif a.startswith("--task="):
            value, span = a.split("=", 1)[1], 1
        else:
            continue
        if value == "caption":
            return module, argv[:i] + argv[i + span:]
        if (argv[0], value) not in _TASK_MODULES:
            known = ["caption"] + [t for c, t in _TASK_MODULES if c == argv[0]]
            raise SystemExit(f"captioner {argv[0]}: --task must be one of {', '.join(known)}, got {value!r}")
        return _TASK_MODULES[argv[0], value], argv
    return module, argv
