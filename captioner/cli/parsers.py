"""The options of every ``captioner`` command, and nothing else: argparse only, so `captioner CMD --help` never
imports torch. Each command's description is its implementation module's docstring, read from the source file.

    parsers.train().parse_args([...])     # -> the Namespace training.train.main() takes

The training commands' options are declared once, as option groups in training/options.py, and composed here.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
from dataclasses import fields
from pathlib import Path
from typing import NoReturn

# light: no torch
from ..generation import OPTIONS, GenerationConfig
from training import options
from .writers import FORMATS


def _doc(module: str) -> str:
    """A module's docstring without importing it (the implementation modules import torch)."""
    spec = importlib.util.find_spec(module)
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) or ""


# = captioner.runtime.PRECISIONS (a test checks): auto is bf16 where the hardware has it natively, else fp16 on
# older GPUs, else fp32
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ENCODER_BACKENDS = ("torch", "onnxruntime")  # = captioner.api.ENCODER_BACKENDS (a test checks)


class Parser(argparse.ArgumentParser):
    """argparse with the conventions scripts rely on: no abbreviations (``--beam 5`` is an error, not a silent
    ``--beam-size``, which a later ``--beam-width`` would break), and an unknown option gets one line with the
    closest real one instead of the whole usage."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        hint = ""
        if message.startswith("unrecognized arguments:"):
            known = [o for a in self._actions for o in a.option_strings]
            for word in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.6)
                if close:
                    hint = f" (did you mean {close[0]}?)"
                    break
        self.exit(2, f"{self.prog}: error: {message}{hint}\nrun '{self.prog} --help' for the options\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default only when it has one and its help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_generation_options(group, only: tuple[str, ...] = OPTIONS, help: dict[str, str] | None = None) -> None:
    """A --flag for each GenerationConfig field in ``only``, with the field's default, type and help (or ``help``'s):
    a field added there is an option here too. GenerationConfig.from_args() reads them back."""
    for f in fields(GenerationConfig):
        if f.name not in only:
            continue
        flag, text = "--" + f.name.replace("_", "-"), (help or {}).get(f.name, f.metadata["help"])
        if f.type == "bool":
            group.add_argument(flag, action="store_true", help=text)
        else:
            kind = {"int": int, "float": float}[f.type.partition(" | ")[0]]
            group.add_argument(flag, type=kind, default=f.default, help=text)


def train(add_help: bool = True) -> argparse.ArgumentParser:
    """`captioner train` (task caption): the option groups of training/options.py."""
    p = Parser("captioner train", add_help=add_help, description=_doc("training.train"),
                                formatter_class=HelpFormatter)
    p.add_argument("--task", choices=["caption", "vqa", "joint"], default="caption",
                   help="caption: a caption model (these options); vqa or joint: a VQA head, alone or with captions "
                        "(see `captioner train --task vqa --help`)")
    options.add_caption_data(p, required=True, min_count=5)
    options.add_model_options(p, task="caption")
    options.add_scst_options(p)
    options.add_optimisation_options(p)
    options.add_run_options(p)
    return p


def train_vqa(add_help: bool = True) -> argparse.ArgumentParser:
    """`captioner train --task vqa|joint`: the groups of `captioner train` (their defaults differ where the table in
    training/options.py says) plus the VQA data and head, without SCST."""
    p = Parser("captioner train --task vqa|joint", add_help=add_help,
                                description=_doc("training.train_vqa"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["vqa", "joint"], required=True)
    options.add_vqa_data(p)
    options.add_caption_data(p, required=False, min_count=3,
                             title="caption data (--task joint; as in `captioner train`)")
    options.add_model_options(p, task="vqa")
    options.add_vqa_head_options(p)
    options.add_optimisation_options(p, only=options.VQA_OPTIMISATION, defaults={"lr": 2e-3},
                                     help={"lr": "learning rate",
                                           "batch_size": "images per step per process (each task)"})
    options.add_run_options(p)
    return p


def distill(add_help: bool = True) -> argparse.ArgumentParser:
    p = Parser("captioner distill", add_help=add_help, description=_doc("training.distill"),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    options.add_distill_images(p)
    options.add_student_options(p)
    options.add_teacher_options(p)
    options.add_cached_labels(p)
    options.add_optimisation_options(p, only=options.DISTILL_OPTIMISATION, defaults=options.DISTILL_DEFAULTS,
                                     help={"lr": "learning rate", "batch_size": "images per step per process",
                                           "channels_last": "NHWC weights for teacher and student (bench/distill.py: "
                                                            "1.3x per step on a 2-core CPU)"})
    options.add_distill_output(p)
    return p


def label(add_help: bool = True) -> argparse.ArgumentParser:
    p = Parser("captioner label", add_help=add_help, description=_doc("training.label"),
                                formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files, folders, globs or @list.txt")
    p.add_argument("--out", required=True, help="run folder (labels.json, paths.txt, part-NNNNN.safetensors)")
    p.add_argument("--exclude-ids", metavar="FILE",
                   help="image ids, one a line (e.g. a test split's): photos whose COCO-style file name carries one "
                        "are never opened")
    p.add_argument("--views", type=int, default=4, help="teacher views per photo: the centre square + random crops")
    p.add_argument("--min-scale", type=float, default=0.35, help="smallest area of a random view")
    p.add_argument("--chunk", type=int, default=256, help="photos per part file (the unit of resume)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random views")
    p.add_argument("--threads", type=int, default=2, help="threads of each network")
    p.add_argument("--workers", type=int, default=1, help="decoding processes")
    p.add_argument("--restart", action="store_true", help="discard a run in --out made with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def pseudo_refs(add_help: bool = True) -> argparse.ArgumentParser:
    p = Parser("captioner pseudo-refs", add_help=add_help, description=_doc("training.pseudo_refs"),
               formatter_class=HelpFormatter)
    p.add_argument("--labels", required=True, metavar="RUN", help="a run of captioner label")
    p.add_argument("--pool", required=True, help="a COCO caption file (its captions are used as text only)")
    p.add_argument("--photos", nargs="+", metavar="INPUT",
                   help="only these labelled photos (files, folders, globs, @list.txt); default: every one")
    p.add_argument("--exclude-ids", nargs="+", metavar="FILE",
                   help="never use pool captions of these image ids (a text file, one a line, or a COCO JSON file)")
    p.add_argument("--per-photo", type=int, default=5, help="pseudo-references per photo")
    p.add_argument("--threshold", type=float, default=0.5, help="detector score that counts an object")
    p.add_argument("--seed", type=int, default=0, help="breaks ties between equally good captions")
    p.add_argument("--out", required=True, help="Karpathy-format JSON to write")
    return p


def evaluate(add_help: bool = True) -> argparse.ArgumentParser:
    p = Parser("captioner evaluate", add_help=add_help, description=_doc("training.evaluate"),
                                formatter_class=HelpFormatter)
    p.add_argument("--task", choices=["caption", "vqa"], default="caption",
                   help="caption: COCO caption metrics (these options); vqa: multiple-choice accuracy "
                        "(see `captioner evaluate --task vqa --help`)")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the shipped model)")
    p.add_argument("--results", help="score this COCO results JSON instead of captioning")
    p.add_argument("--dataset", choices=["karpathy", "coco"], default="karpathy")
    p.add_argument("--annotations", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--max-images", type=int, default=0)
    add_generation_options(p, only=("beam_size", "max_length", "length_penalty", "block_trigrams"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--out", default="results.json", help="COCO results file to write")
    p.add_argument("--metrics-out", help="metrics JSON (default: next to --out)")
    p.add_argument("--no-java", action="store_true", help="Python tokenization, METEOR skipped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def evaluate_vqa(add_help: bool = True) -> argparse.ArgumentParser:
    p = Parser("captioner evaluate --task vqa", add_help=add_help,
                                description=_doc("training.evaluate_vqa"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["vqa"], default="vqa")
    p.add_argument("--checkpoint", help="checkpoint directory with a VQA head (default: the shipped model)")
    p.add_argument("--blind-checkpoint", help="a model trained with --image-blind, scored on the same questions")
    p.add_argument("--dataset", choices=["easy-vqa", "v7w", "vqa-mc"], default="easy-vqa")
    p.add_argument("--annotations", help="v7w: dataset_v7w_telling.json; vqa-mc: mscoco_*_annotations.json")
    p.add_argument("--questions", help="vqa-mc: MultipleChoice_mscoco_*_questions.json")
    p.add_argument("--images", help="image folder (v7w, vqa-mc)")
    p.add_argument("--split", default="test")
    p.add_argument("--num-choices", type=int, default=4, help="easy-VQA: most choices per question")
    p.add_argument("--seed", type=int, default=0, help="easy-VQA: distractor seed")
    p.add_argument("--max-questions", type=int, default=0, help="score only the first N questions (0 = all)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--out", default="vqa_results.json", help="per-question predictions")
    p.add_argument("--metrics-out", help="metrics JSON (default: next to --out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def make_vqa(add_help: bool = True) -> argparse.ArgumentParser:
    p = Parser("captioner make-vqa", add_help=add_help, description=_doc("training.make_vqa"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--karpathy", nargs=2, action="append", metavar=("ANNOTATIONS", "IMAGES"),
                   help="a Karpathy split JSON and its image root (repeatable); the --splits of it are used")
    p.add_argument("--coco", nargs=3, action="append", metavar=("CAPTIONS", "IMAGES", "SPLIT"),
                   help="a COCO captions JSON, its image folder and the split its questions get (repeatable); "
                        "instances_*.json beside it, if there, decides presence and people counts")
    p.add_argument("--splits", nargs="+", default=["train", "val"],
                   help="Karpathy splits to use (keep test out of anything you train or select on)")
    p.add_argument("--labels", metavar="RUN", help="a captioner label run: presence and count questions from its "
                                                   "detections for photos without captions")
    p.add_argument("--label-photos", nargs="+", metavar="INPUT", help="only these photos of --labels (default all)")
    p.add_argument("--label-split", default="train", help="the split the --labels questions get")
    p.add_argument("--label-threshold", type=float, default=0.5, help="detector score that counts an object")
    p.add_argument("--image-root", help="filenames are written relative to this folder (default: the deepest "
                                        "folder above every image); give it as --vqa-images when training")
    p.add_argument("--min-support", type=int, default=2, help="captions that must say an answer (none may "
                                                               "contradict it)")
    p.add_argument("--num-choices", type=int, default=4, help="choices per question (yes/no questions have 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="Visual7W telling JSON (and OUT.stats.json beside it)")
    return p


def caption(add_help: bool = True) -> argparse.ArgumentParser:
    p = Parser(
        "captioner caption", add_help=add_help, description=_doc("captioner.cli.caption"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  captioner caption photos/ --out captions.jsonl\n"
               "  captioner caption 'shots/**/*.png' @more.txt --out gallery.html --beam-size 5 --num-captions 3\n"
               "  captioner caption --dataset karpathy --annotations dataset_coco.json --images coco/ --split test "
               "--out results.json\n  torchrun --nproc_per_node=8 -m captioner caption photos/ --out captions.jsonl\n"
               "  captioner caption /mnt/photos/ --out /mnt/captions.parquet --engine ray --concurrency 8 --num-gpus 1")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="image files, folders (recursive), glob patterns (quote them; ** recurses), or @list.txt "
                        "(one path per line, relative to the current directory)")
    p.add_argument("--out", required=True,
                   help="output file: .jsonl records, .json COCO results, .parquet table, or .html gallery")
    p.add_argument("--format", choices=FORMATS, help="output format (default: from --out's suffix)")
    p.add_argument("--checkpoint", help="model directory (default: the model shipped with the package)")
    g = p.add_argument_group("dataset input (instead of INPUT)")
    g.add_argument("--dataset", choices=["coco", "karpathy"], help="caption a dataset split; records get its image ids")
    g.add_argument("--annotations", help="COCO captions JSON or Karpathy split JSON")
    g.add_argument("--images", help="image folder of the dataset")
    g.add_argument("--split", default="test", help="Karpathy split (for coco, just a label)")
    g = p.add_argument_group("decoding")
    add_generation_options(g, help={
        "attention": "attention models: store each caption's words and per-word attention maps in the records; the "
                     ".html gallery shows the best caption's words as a strip of heatmap overlays"})
    g.add_argument("--seed", type=int, help="random seed for --sample")
    g = p.add_argument_group("execution")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--workers", type=int, default=None,
                   help="loader processes that read and preprocess images while the model runs (0 = in-process; "
                        "default: the CPU cores per process, at most 8); on a CPU-only run they yield the cores to "
                        "the model (nice 19; the environment variable CAPTIONER_LOADER_NICE=0..19 overrides); "
                        "--engine ray: decode tasks running at once (default: as many as free CPUs allow)")
    g.add_argument("--model-workers", type=int, default=None,
                   help="local engine: batches the model captions at once, each in its own thread (default: 2 on a "
                        "CPU with 2 or more torch threads, which are split between them; 1 on GPU and with --sample); "
                        "the output is the same, in the same order")
    g.add_argument("--device",
                   help="cpu, cuda, cuda:1 ... (default: CUDA if available; under torchrun cuda:LOCAL_RANK)")
    g.add_argument("--precision", choices=PRECISIONS, default="auto")
    g.add_argument("--encoder-backend", choices=ENCODER_BACKENDS, default="torch",
                   help="what runs the image encoder: torch, or onnxruntime (CPU, local engine; pip install "
                        "\"captioner[onnx]\"; the model is exported in memory at start; captions equal to torch's; "
                        "bench/onnxrt.py measures both on your machine)")
    g.add_argument("--shard", help="i/n: caption only the i-th of n shards (0-based) into OUT.shard{i}-of-{n}.jsonl; "
                                   "join them with `captioner merge --out OUT` (automatic under torchrun)")
    g.add_argument("--retry-errors", action="store_true", help="on resume, redo images that failed before")
    again = g.add_mutually_exclusive_group()
    again.add_argument("--restart", action="store_true",
                       help="start over: discard what an earlier run wrote to --out (by default a rerun resumes it)")
    again.add_argument("--resume-anyway", action="store_true",
                       help="resume although the earlier run used other decoding options or another model (by "
                            "default that is refused: the output would mix two kinds of captions)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("engine")
    g.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this machine, a loader feeding the model (with --shard or torchrun for more); ray: "
                        "Ray Data, decode tasks feeding a pool of model actors across a Ray cluster (pip install "
                        "'captioner[ray]'); the same inputs, outputs and resume either way")
    g.add_argument("--address",
                   help="ray: the cluster to join, HOST:PORT or auto (default: $RAY_ADDRESS, else the cluster "
                        "`ray start` started on this machine, else a new one on this machine's cores, stopped at "
                        "the end)")
    g.add_argument("--concurrency", metavar="N|MIN-MAX",
                   help="ray: model actors, each loading the model once (default 1; MIN-MAX: a pool Ray grows "
                        "while there is work)")
    g.add_argument("--num-gpus", type=float, metavar="G",
                   help="ray: GPUs per model actor (fractions share one; default 1 when the cluster has GPUs and "
                        "--device is not cpu, else 0)")
    return p


def ask(add_help: bool = True) -> argparse.ArgumentParser:
    p = Parser("captioner ask", add_help=add_help, description=_doc("captioner.cli.ask"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="image file")
    p.add_argument("--question", "-q", required=True)
    p.add_argument("--choice", "-c", action="append", default=[], help="a candidate answer; repeat for each")
    p.add_argument("--checkpoint", help="checkpoint directory with a VQA head (default: the shipped model)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA if available)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def export(add_help: bool = True) -> argparse.ArgumentParser:
    p = Parser("captioner export", add_help=add_help, description=_doc("captioner.cli.export"),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="trained checkpoint directory (e.g. runs/x/best)")
    p.add_argument("--out", required=True, help="directory to write (replaced atomically)")
    p.add_argument("--format", choices=["safetensors", "onnx"], default="safetensors",
                   help="onnx: the encoder and the caption decoder's single step as ONNX graphs (fp32) with config.json, "
                        "vocab.json and decoding.json, for ONNX Runtime, Triton or TensorRT (pip install -e '.[onnx]')")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16",
                   help="storage type of float weights (safetensors)")
    p.add_argument("--name", help="model name recorded in config.json")
    p.add_argument("--version", help="model version recorded in config.json")
    p.add_argument("--metrics", action="append", default=[], metavar="JSON",
                   help="evaluation metrics JSON to merge into metrics.json under 'evaluations' (repeatable)")
    p.add_argument("--card", help="Markdown model card to ship as README.md (default: the checkpoint's own)")
    p.add_argument("--domain", help="one line saying what the model knows (metrics.json 'domain'; the web page and "
                                    "/v1/models show it)")
    p.add_argument("--add-decoders", nargs="+", default=[], metavar="DIR",
                   help="ensemble: add the caption decoders of these checkpoints, trained on this one's frozen encoder "
                        "with its vocabulary (`captioner train --init-from CHECKPOINT --fresh-decoder --freeze-encoder`)")
    return p


def merge(add_help: bool = True) -> argparse.ArgumentParser:
    p = Parser("captioner merge", add_help=add_help, description=_doc("captioner.cli.merge"))
    p.add_argument("parts", nargs="*", metavar="PART", help="part files (default: every OUT.shard*-of-N.jsonl)")
    p.add_argument("--out", required=True, help="final output: .jsonl, .json (COCO results), .parquet or .html")
    p.add_argument("--format", choices=FORMATS, help="output format (default: from --out's suffix)")
    p.add_argument("--workers", type=int, default=4, help="threads making HTML thumbnails")
    p.add_argument("--no-progress", action="store_true")
    return p


def serve() -> argparse.ArgumentParser:
    p = Parser("captioner serve", description=_doc("captioner.cli.serve"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--checkpoint", default=None, help="checkpoint directory (env CAPTIONER_CHECKPOINT; default: the shipped model)")
    a("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    a("--precision", choices=PRECISIONS, default=None,
      help="autocast precision (default auto: bf16 where the hardware has it natively, fp16 on older GPUs, else fp32)")
    a("--host", default=None, help="address to bind (default 127.0.0.1; 0.0.0.0 in containers)")
    a("--port", type=int, default=None, help="port (default 8000; 0 = any free port)")
    a("--max-batch-size", type=int, default=None, help="most requests per model batch (default 32)")
    a("--max-delay-ms", type=float, default=None, help="wait at most this long after a batch's first request (default 5)")
    a("--model-workers", type=int, default=None,
      help="batches the model runs at once, each in its own thread (default: 2 on a CPU with 2 or more torch threads, "
           "which are split between them; 1 on GPU)")
    a("--max-queue", type=int, default=None, help="queued requests beyond this get 503 (default 256)")
    a("--request-timeout", dest="request_timeout_s", type=float, default=None,
      help="seconds before a request gets 504 and its work is dropped (default 30)")
    a("--max-upload-bytes", type=int, default=None, help="largest image upload (default 10 MiB)")
    a("--max-image-pixels", type=int, default=None, help="largest width x height (default 40,000,000)")
    a("--max-aspect-ratio", type=float, default=None,
      help="most elongated image, longer/shorter side (default 100): the resize would blow up thinner ones")
    a("--client-timeout", dest="client_timeout_s", type=float, default=None,
      help="seconds a client may take to send its request headers, or pause while sending a body (default 10)")
    a("--shutdown-timeout", dest="shutdown_timeout_s", type=float, default=None,
      help="after SIGTERM, cut uploads still arriving after this many seconds; queued requests are still "
           "answered (default 20)")
    a("--decode-workers", type=int, default=None, help="threads decoding uploaded images (default 4)")
    a("--decode-memory-mb", type=int, default=None,
      help="MiB of decoded pixels in flight across requests; decodes past it wait (default 512)")
    a("--api-key", dest="api_keys", action="append", default=None,
      help="require this key (Authorization: Bearer or X-API-Key); repeat for several (env: comma-separated)")
    a("--cors-origin", dest="cors_origins", action="append", default=None,
      help="allow browser calls from this origin; repeat for several; '*' for any")
    a("--log-level", choices=["critical", "error", "warning", "info", "debug"], default=None)
    a("--log-format", choices=["text", "json"], default=None,
      help="text lines (default) or one JSON object per line, for log shippers")
    a("--no-access-log", dest="access_log", action="store_false", default=None,
      help="no log line per request (by default: method, path, status, ms, batch size, request id)")
    a("--no-warmup", dest="warmup", action="store_false", default=None, help="skip the warm-up batches")
    a("--no-channels-last", dest="channels_last", action="store_false", default=None,
      help="keep NCHW convolutions (NHWC is the default: faster on CPU and GPU)")
    a("--torch-threads", type=int, default=None,
      help="torch intra-op threads in all (default: torch's choice), split among the model workers")
    a("--encode-batch-size", type=int, default=None,
      help="images per encoder call within a batch (default: 8 on CPU, where small convolution batches stay in "
           "cache, the whole batch on GPU)")
    a("--encoder-backend", choices=ENCODER_BACKENDS, default=None,
      help="what runs the image encoder: torch (default), or onnxruntime on CPU (pip install \"captioner[onnx]\")")
    return p
