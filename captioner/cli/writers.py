"""Caption output files: the append-only JSONL record file (the source of truth, resumable), and the COCO results
JSON, the Parquet table and the self-contained HTML gallery rendered from it.

A record is one JSON object per line:
    {"path": ..., "image_id": ... (when known), "captions": [{"caption", "log_prob", "score"}, ...], "index": n}
or, for an image that could not be read,
    {"path": ..., "image_id": ..., "error": "why", "index": n}
``index`` is the image's position in the expanded input list; ``captioner merge`` orders shards by it.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import stat
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..fileio import atomic_write, write_json_atomic, write_text_atomic
from ..inputs import path_key

FORMATS = ("jsonl", "coco", "parquet", "html")
_SUFFIX_FORMAT = {".jsonl": "jsonl", ".json": "coco", ".parquet": "parquet", ".html": "html", ".htm": "html"}


STDOUT = "-"  # --out -: JSONL records on standard output


def format_for(out: str, fmt: str | None) -> str:
    """--format, else the suffix of --out (.jsonl, .json = COCO results, .parquet, .html/.htm); JSONL for ``-``."""
    if out == STDOUT:
        if fmt not in (None, "jsonl"):
            raise ValueError("--out - writes JSONL records to standard output; other formats need a file name")
        return "jsonl"
    if fmt:
        if fmt not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    else:
        suffix = Path(out).suffix.lower()
        if suffix not in _SUFFIX_FORMAT:
            raise ValueError(f"cannot tell the output format from {out!r}: use a .jsonl, .json (COCO results), "
                             f".parquet or .html file name, or pass --format {{{','.join(FORMATS)}}}")
        fmt = _SUFFIX_FORMAT[suffix]
    if fmt == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise ValueError("Parquet output needs pyarrow: pip install pyarrow (it comes with "
                             "'captioner[ray]')") from None
    return fmt


def records_path(out: str, fmt: str, shard: tuple[int, int] | None = None) -> str:
    """Where a run appends its JSONL records: the output itself (unsharded JSONL), ``OUT.records.jsonl`` beside a
    COCO/Parquet/HTML output, or ``OUT.shard{i}-of-{n}.jsonl`` for one shard of a sharded run."""
    if shard is not None:
        return f"{out}.shard{shard[0]}-of-{shard[1]}.jsonl"
    return out if fmt == "jsonl" else f"{out}.records.jsonl"


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class RecordFile:
    records: list[dict[str, Any]] = field(default_factory=list)  # empty when read with keep=False
    done: dict[str, bool] = field(default_factory=dict)  # path_key -> whether its record is an error
    torn_bytes: int = 0  # size of a trailing line without newline (a write cut short by a kill)
    bad_lines: int = 0  # complete lines that are not JSON objects with a path (should never happen)


def read_records(path: str, repair: bool = False, keep: bool = True) -> RecordFile:
    """Read a JSONL record file. A trailing partial line is ignored, and cut off the file when ``repair``
    (so the next append starts on a line boundary). ``keep=False`` only collects ``done`` (resume needs no more,
    and millions of full records would not fit in memory)."""
    rf = RecordFile()
    if not os.path.exists(path):
        return rf
    good_end = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                rf.torn_bytes = len(line)
                break
            good_end += len(line)
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                rec = None
            if isinstance(rec, dict) and isinstance(rec.get("path"), str):
                rf.done[path_key(rec["path"])] = "error" in rec
                if keep:
                    rf.records.append(rec)
            else:
                rf.bad_lines += 1
    if rf.torn_bytes and repair:
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return rf


def drop_errors(path: str) -> int:
    """Rewrite a record file without its error records (so ``--retry-errors`` redoes them); returns how many."""
    rf = read_records(path, repair=True)
    keep = [r for r in rf.records if "error" not in r]
    if len(keep) != len(rf.records):
        write_text_atomic(path, lambda f: f.writelines(json_line(r) for r in keep))
    return len(rf.records) - len(keep)


def in_input_order(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records sorted by input position, one per image (first record of a path wins)."""
    seen: set[str] = set()
    out = []
    for r in sorted(records, key=lambda r: r.get("index", float("inf"))):  # stable: file order breaks ties
        k = path_key(r["path"])
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


# ---------------------------------------------------------------------------------------------- appending


def json_line(rec: dict[str, Any]) -> str:
    return json.dumps(rec, ensure_ascii=False) + "\n"


class RecordWriter:
    """Appends whole lines; each batch is one write, flushed and fsynced, so a kill loses at most the batch
    being written, and leaves at worst a torn last line, which ``read_records(repair=True)`` removes."""

    def __init__(self, path: str) -> None:
        self.path = path
        if path == STDOUT:  # a pipe (into jq, say): whole lines a batch at a time, nothing to sync or resume
            self._f: IO[bytes] = sys.stdout.buffer
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._f = open(path, "ab")
        self._sync = stat.S_ISREG(os.fstat(self._f.fileno()).st_mode)

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            return
        self._f.write("".join(json_line(r) for r in records).encode("utf-8"))
        self._f.flush()
        if self._sync:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if self.path != STDOUT:
            self._f.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- final outputs


def coco_results(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """``[{"image_id", "caption"}]`` with each captioned image's best caption; images without an id use their path."""
    return [{"image_id": r["image_id"] if r.get("image_id") is not None else r["path"],
             "caption": r["captions"][0]["caption"]} for r in records if r.get("captions")]


def thumbnail_jpeg(path: str, max_side: int = 256) -> bytes | None:
    """A small JPEG of the image (longest side <= max_side), or None when it cannot be read."""
    from captioner.pixels import load_image

    try:  # load_image opens regular files only (a FIFO would block) and decodes them as the model sees them
        im = load_image(path, min_side=max_side)
        im.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=80)
        return buf.getvalue()
    except Exception:  # noqa: BLE001 - any unreadable file just gets no thumbnail
        return None


def attention_strip(path: str, maps: Sequence[Sequence[Sequence[float]]], crop: float, side: int = 80
                    ) -> list[bytes] | None:
    """One small JPEG per word: the centre crop the model saw (``crop`` of the shorter side), the word's attention
    map upsampled over it in red. None when the image cannot be read."""
    from PIL import Image

    from captioner.pixels import load_image

    try:
        im = load_image(path, min_side=4 * side)
    except Exception:  # noqa: BLE001 - any unreadable file just gets no strip
        return None
    w, h = im.size
    c = min(w, h) * crop
    im = im.crop((round((w - c) / 2), round((h - c) / 2), round((w + c) / 2), round((h + c) / 2)))
    im = im.resize((side, side), Image.BILINEAR)
    red = Image.new("RGB", (side, side), (255, 40, 0))
    out = []
    for m in maps:
        top = max(max(r) for r in m) or 1.0
        cells = Image.frombytes("L", (len(m[0]), len(m)), bytes(round(200 * x / top) for r in m for x in r))
        alpha = cells.resize((side, side), Image.BILINEAR)
        shaded = Image.composite(red, im, alpha)
        buf = io.BytesIO()
        shaded.save(buf, "JPEG", quality=80)
        out.append(buf.getvalue())
    return out


def _strip(r: dict[str, Any]) -> list[bytes] | None:
    caps = r.get("captions") or []
    if not caps or "attention" not in caps[0] or not caps[0]["attention"]:
        return None
    return attention_strip(r["path"], caps[0]["attention"], r.get("attention_crop", 1.0))


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
.grid{display:flex;flex-wrap:wrap;gap:14px}
figure{margin:0;width:260px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
figure img{display:block;max-width:256px;max-height:256px;margin:auto}
.noimg{height:120px;display:flex;align-items:center;justify-content:center;background:#eee;color:#888}
.path{font-size:11px;color:#666;word-break:break-all;margin-top:6px}
ol{margin:4px 0 0 1.2em;padding:0} .lp{color:#999;font-size:11px}
figure.error{border-color:#d33} .err{color:#b00;font-size:13px;word-break:break-word}
.strip{display:flex;flex-wrap:wrap;gap:3px;margin-top:6px} .strip span{display:flex;flex-direction:column;
align-items:center;font-size:11px} .strip img{width:60px;height:60px;margin:0}"""


def write_html(path: str, records: Sequence[dict[str, Any]], title: str = "Captions", workers: int = 4,
               progress: bool = True) -> None:
    """One self-contained HTML file: every image as an embedded base64 thumbnail with its captions (or its
    error), readable offline and movable anywhere. Captions and paths are HTML-escaped."""
    from tqdm import tqdm

    esc = html.escape
    n_err = sum("error" in r for r in records)

    def fill(f: IO[str]) -> None:
        f.write(f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
                f"<style>{_CSS}</style></head><body>\n<h1>{esc(title)}</h1>\n"
                f"<p>{len(records)} images, {n_err} could not be read.</p>\n<div class=\"grid\">\n")
        with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes with the GIL released
            thumbs = pool.map(thumbnail_jpeg, [r["path"] for r in records])
            strips = pool.map(_strip, records)  # --attention: the best caption's per-word overlays
            bar = tqdm(zip(records, thumbs, strips), total=len(records), desc="thumbnails", unit="img",
                       disable=not progress, file=sys.stderr, dynamic_ncols=True)
            for r, jpg, strip in bar:
                p = esc(r["path"])
                cls = "item error" if "error" in r else "item"
                f.write(f"<figure class=\"{cls}\" data-path=\"{p}\">")
                if jpg is not None:
                    f.write(f"<img src=\"data:image/jpeg;base64,{base64.b64encode(jpg).decode()}\" alt=\"{p}\">")
                else:
                    f.write("<div class=\"noimg\">no preview</div>")
                f.write(f"<figcaption><div class=\"path\">{p}</div>")
                if "error" in r:
                    f.write(f"<p class=\"err\">{esc(str(r['error']))}</p>")
                else:
                    f.write("<ol>" + "".join(
                        f"<li><span class=\"cap\">{esc(c['caption'])}</span> "
                        f"<span class=\"lp\">log p {c['log_prob']:.2f}</span></li>" for c in r.get("captions", []))
                            + "</ol>")
                    if strip:
                        words = r["captions"][0]["words"]
                        f.write("<div class=\"strip\">" + "".join(
                            f"<span><img src=\"data:image/jpeg;base64,{base64.b64encode(b).decode()}\" "
                            f"alt=\"{esc(w)}\">{esc(w)}</span>" for w, b in zip(words, strip)) + "</div>")
                f.write("</figcaption></figure>\n")
        f.write("</div>\n</body></html>\n")

    write_text_atomic(path, fill)


def write_parquet(path: str, records: Sequence[dict[str, Any]]) -> None:
    """One Parquet file (atomically): a row per record with the columns path, image_id, index, captions (the type
    captioner.ray's Datasets give them), error, and with --attention attention_crop."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..api import Caption

    ids = {type(r["image_id"]) for r in records if r.get("image_id") is not None}
    as_text = not ids <= {int}  # dataset ids are ints; a mix with path-named images is stored as text
    attention = any("attention_crop" in r for r in records)
    fields = [("path", pa.string()), ("image_id", pa.string() if as_text else pa.int64()), ("index", pa.int64()),
              ("captions", Caption.arrow_type(attention)), ("error", pa.string())]
    if attention:
        fields.append(("attention_crop", pa.float64()))
    rows = [{**r, "image_id": str(r["image_id"])} if as_text and r.get("image_id") is not None else r
            for r in records]
    table = pa.Table.from_pylist(rows, schema=pa.schema(fields))
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def write_output(out: str, fmt: str, records: Sequence[dict[str, Any]], title: str = "Captions", workers: int = 4,
                 progress: bool = True) -> None:
    """Write the final output file (atomically) from records already in input order."""
    if fmt == "jsonl":
        write_text_atomic(out, lambda f: f.writelines(json_line(r) for r in records))
    elif fmt == "coco":
        write_json_atomic(out, coco_results(records))
    elif fmt == "parquet":
        write_parquet(out, records)
    elif fmt == "html":
        write_html(out, records, title=title, workers=workers, progress=progress)
    else:
        raise ValueError(f"unknown format {fmt!r}")


def iter_parts(paths: Sequence[str]) -> Iterator[dict[str, Any]]:
    for p in paths:
        yield from read_records(p).records
