"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE) via pycocoevalcap, plus results-file I/O.

We run pycocoevalcap's scorers ourselves instead of ``COCOEvalCap.evaluate()``: that one always runs SPICE,
which downloads Stanford CoreNLP on first use and, offline, crashes the whole evaluation.
Scores are on pycocoevalcap's 0-1 scale; ``format_metrics`` shows them x100.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer

from captioner.fileio import write_json_atomic

log = logging.getLogger(__name__)

ImageId = Hashable  # COCO ids are ints, other datasets use strings; kept exactly as given
METRIC_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE")
SPICE_MISSING_NOTE = ("SPICE unavailable: Stanford CoreNLP models not installed "
                      "(downloaded on first use; no network)")


# ----------------------------------------------------------------------------------------------- tokenization

def _clean(text: str) -> str:
    # PTBTokenizer runs with -preserveLines and zips its output lines back onto the inputs, so any line break
    # (\r, \u2028, ... not only \n) shifts every later caption onto the wrong image; METEOR's stdio protocol
    # uses '|||' as its field separator and hangs waiting for output on extra lines. Collapse all whitespace.
    return " ".join(text.replace("|||", " ").split())


_PUNCT = frozenset(PUNCTUATIONS)  # exactly what PTBTokenizer drops (note: "-LRB-" never matches lowercased output)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_ABBREV = frozenset("mr mrs ms dr st jr sr vs etc inc co ltd mt ft ave".split())
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na"}
_SPLIT = re.compile(r"\.\.\.|[;!?+=%#$&*]|[,:](?!\d)|(?<!\d)[,:]|[()\[\]{}]")


def python_tokenize(text: str) -> str:
    """Pure-Python stand-in for the Java PTBTokenizer + punctuation removal that the COCO scorers expect.

    Matches PTB on ordinary captions (lowercase, clitics split, final period / commas / quotes dropped,
    brackets as -lrb-); rare constructs may differ slightly, so scores are close to, not identical with, Java's.
    """
    text = _clean(text).lower().translate({0x2018: "'", 0x2019: "'", 0x201C: '"', 0x201D: '"', 0x60: '"'})
    text = _SPLIT.sub(lambda m: f" {_BRACKETS.get(m.group(), m.group())} ", text.replace('"', " "))
    out: list[str] = []
    for tok in " ".join(_SPLIT_WORDS.get(t, t) for t in text.split()).split():
        if tok.startswith("'") and not _CLITIC.match("x" + tok):
            tok = tok.lstrip("'")  # opening single quote
        tok = tok.rstrip("'") or tok  # closing quote / plural possessive ("dogs'")
        tail: list[str] = []
        if tok.endswith(".") and tok.strip("."):
            body = tok[:-1]
            # PTB keeps the period of acronyms ("u.s.", "p.m."), abbreviations ("mr.") and initials ("j.", "a.")
            if "." not in body and body not in _ABBREV and not (len(body) == 1 and body.isalpha()):
                tok, tail = body.rstrip("'") or body, ["."]  # "'stop'." -> stop
        while (m := _CLITIC.match(tok)) is not None:  # "they'd've" -> they 'd 've; "can't" -> ca n't
            tok, tail = m.group(1), [m.group(2), *tail]
        out.extend([tok, *tail] if tok else tail)
    return " ".join(t for t in out if t not in _PUNCT)


def _tokenize_java(captions: Mapping[Any, list[str]]) -> dict[Any, list[str]]:
    """All captions through one PTBTokenizer JVM; verifies nothing got shifted between images."""
    tokenized = PTBTokenizer().tokenize({k: [{"caption": c} for c in caps] for k, caps in captions.items()})
    bad = [k for k, caps in captions.items() if len(tokenized.get(k, ())) != len(caps)]
    if bad:
        raise RuntimeError(f"PTBTokenizer output misaligned for {len(bad)} entries, e.g. {bad[:3]}")
    return tokenized


# ----------------------------------------------------------------------------------------------- scorers

def spice_available() -> bool:
    """True when SPICE's CoreNLP jars are already installed (otherwise Spice() would try to download them)."""
    from pycocoevalcap.spice import get_stanford_models as g  # module import downloads nothing

    lib = Path(g.SPICEDIR) / g.SPICELIB
    return (Path(g.SPICEDIR) / "spice-1.0.jar").is_file() and all(
        (lib / f"{g.JAR}{suffix}.jar").is_file() for suffix in ("", "-models"))


def _close_meteor(meteor: Meteor) -> None:
    # Meteor.compute_score leaves its lock held when it raises, and Meteor.__del__ acquires that lock: without
    # this release a failed run deadlocks at garbage collection (often at interpreter exit).
    if meteor.lock.locked():
        meteor.lock.release()
    proc = meteor.meteor_p
    proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        try:
            pipe.close()
        except OSError:
            pass


def _run_meteor(meteor: Meteor, gts: dict, res: dict, timeout_s: float) -> float:
    """METEOR on a worker thread so a wedged jar becomes a TimeoutError instead of a hang."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["score"] = float(meteor.compute_score(gts, res)[0])
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            box["error"] = e

    worker = threading.Thread(target=work, name="meteor", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        meteor.meteor_p.kill()  # the worker's readline then hits EOF and ends
        worker.join(5)
        raise TimeoutError(f"METEOR gave no result within {timeout_s:.0f}s")
    if "error" in box:
        raise box["error"]
    return box["score"]


def _validate(predictions: Mapping[ImageId, str], references: Mapping[ImageId, Sequence[str]]) -> list[ImageId]:
    if not predictions:
        raise ValueError("no predictions to score")
    no_refs = [i for i in predictions if i not in references]
    no_pred = [i for i in references if i not in predictions]
    if no_refs or no_pred:
        parts = [f"{len(no_refs)} predictions have no references, e.g. {no_refs[:5]!r}"] if no_refs else []
        parts += [f"{len(no_pred)} referenced images have no prediction, e.g. {no_pred[:5]!r}"] if no_pred else []
        raise ValueError("; ".join(parts) + " (image ids are matched exactly: 42 and '42' differ)")
    for i, cap in predictions.items():
        if not isinstance(cap, str):
            raise TypeError(f"prediction for image {i!r} is {type(cap).__name__}, expected str")
        refs = references[i]
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references for image {i!r} must be a non-empty list of str, got {refs!r:.80}")
    return list(predictions)


def score_captions(predictions: Mapping[ImageId, str], references: Mapping[ImageId, Sequence[str]],
                   use_java: bool | None = None, *, meteor_timeout_s: float | None = None) -> dict[str, Any]:
    """Corpus-level COCO caption metrics for one caption per image against its reference captions.

    ``use_java``: None = use Java when it is on PATH; False = pure-Python tokenization and no METEOR/SPICE;
    True = require Java. Returns floats on the 0-1 scale (None where a metric could not run, explained in
    ``notes``), plus ``num_images`` and ``tokenizer`` ("ptb-java" or "python").
    """
    ids = _validate(predictions, references)
    notes: list[str] = []
    java = shutil.which("java") is not None
    if use_java and not java:
        raise RuntimeError("use_java=True but no `java` on PATH")
    if not (java and use_java is not False):
        reason = "Java not found" if not java else "Java disabled (use_java=False)"
        notes.append(f"{reason}: PTB tokenizer replaced by Python tokenization, METEOR skipped")
        log.warning("%s", notes[-1])
        java = False

    # Start the METEOR JVM first: it spends ~5 s loading its paraphrase table, overlapped with the work below.
    meteor: Meteor | None = None
    if java:
        try:
            meteor = Meteor()
        except Exception as e:  # noqa: BLE001 - e.g. jar missing; the other metrics still stand
            notes.append(f"METEOR failed to start: {e!r}")
    try:
        captions = {("gts", i): [_clean(r) for r in references[i]] for i in ids}
        captions.update({("res", i): [_clean(predictions[i])] for i in ids})
        tokenizer = "python"
        if java:
            try:
                tokenized = _tokenize_java(captions)
                tokenizer = "ptb-java"
            except Exception as e:  # noqa: BLE001 - fall back rather than lose the whole evaluation
                notes.append(f"PTB tokenizer failed ({e!r}); used Python tokenization")
                log.warning("%s", notes[-1])
        if tokenizer == "python":
            tokenized = {k: [python_tokenize(c) for c in caps] for k, caps in captions.items()}
        gts = {i: tokenized[("gts", i)] for i in ids}
        res = {i: tokenized[("res", i)] for i in ids}

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out: dict[str, Any] = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
        out["METEOR"] = None
        out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        out["CIDEr-D"] = float(Cider().compute_score(gts, res)[0])  # pycocoevalcap's "CIDEr" is CIDEr-D
        if meteor is not None:
            try:
                timeout = meteor_timeout_s if meteor_timeout_s is not None else 120 + 0.05 * len(ids)
                out["METEOR"] = _run_meteor(meteor, gts, res, timeout)
            except Exception as e:  # noqa: BLE001
                notes.append(f"METEOR failed: {e!r}")
                log.warning("%s", notes[-1])
    finally:
        if meteor is not None:
            _close_meteor(meteor)

    out["SPICE"] = None
    if not spice_available():
        notes.append(SPICE_MISSING_NOTE)
    elif not java:
        notes.append("SPICE skipped: needs Java")
    else:
        try:
            from pycocoevalcap.spice.spice import Spice

            out["SPICE"] = float(Spice().compute_score(gts, res)[0])
        except Exception as e:  # noqa: BLE001 - SPICE needs ~8 GB heap and sortable ids; never fatal
            notes.append(f"SPICE failed: {e!r}")
            log.warning("%s", notes[-1])
    return {**{k: out[k] for k in METRIC_KEYS}, "num_images": len(ids), "tokenizer": tokenizer, "notes": notes}


def format_metrics(m: Mapping[str, Any]) -> str:
    """One line, scores x100 to one decimal: "BLEU-1 55.1 BLEU-4 14.2 ... SPICE n/a"."""
    keys = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE")
    return " ".join(f"{k} {'n/a' if m.get(k) is None else f'{100 * m[k]:.1f}'}" for k in keys)


# ----------------------------------------------------------------------------------------------- files

def write_results(path: str | os.PathLike, predictions: Mapping[ImageId, str]) -> None:
    """COCO results file: ``[{"image_id": ..., "caption": ...}, ...]``."""
    write_json_atomic(path, [{"image_id": i, "caption": c} for i, c in predictions.items()])


def read_results(path: str | os.PathLike) -> dict[ImageId, str]:
    """Inverse of ``write_results``; ValueError naming the file and the problem if it is malformed."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed COCO results file: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: malformed COCO results file: expected a JSON list, got {type(data).__name__}")
    out: dict[ImageId, str] = {}
    for n, row in enumerate(data):
        if not (isinstance(row, dict) and "image_id" in row and isinstance(row.get("caption"), str)):
            raise ValueError(f"{path}: malformed COCO results file: entry {n} is {row!r:.80}, "
                             'expected {"image_id": ..., "caption": str}')
        if not isinstance(row["image_id"], (int, str)) or isinstance(row["image_id"], bool):
            raise ValueError(f"{path}: malformed COCO results file: entry {n} image_id {row['image_id']!r}")
        if row["image_id"] in out:
            raise ValueError(f"{path}: malformed COCO results file: duplicate image_id {row['image_id']!r}")
        out[row["image_id"]] = row["caption"]
    return out
