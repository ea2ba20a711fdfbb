"""Batch runs that always finish: a file name that is not UTF-8, a FIFO beside the photos, a full disk."""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from captioner.cli import writers
from test_caption_cli import caption, read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_file_name_that_is_not_utf8_is_an_error_record_and_the_run_finishes(tmp_path, make_images,
                                                                               tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    good = make_images(3, "imgs")
    os.rename(os.fsencode(good[1]), os.fsencode(tmp_path / "imgs") + b"/b\xff\xfe.jpg")
    out = tmp_path / "o.jsonl"
    assert caption("imgs", "--out", out, "--batch-size", "2", ckpt=tiny_checkpoint) == 1
    recs = {r["path"]: r for r in read_jsonl(out)}
    assert set(recs) == {"imgs/img0.jpg", "imgs/img2.jpg", "imgs/b\\xff\\xfe.jpg"}
    assert "not valid UTF-8" in recs["imgs/b\\xff\\xfe.jpg"]["error"]
    assert recs["imgs/img0.jpg"]["captions"] and recs["imgs/img2.jpg"]["captions"]
    err = capsys.readouterr().err
    assert "2 captioned, 1 failed" in err and "skipped imgs/b\\xff\\xfe.jpg" in err
    # a rerun finds everything done: nothing doubled, the same exit status as any run with an unreadable image
    assert caption("imgs", "--out", out, ckpt=tiny_checkpoint) == 1
    assert "0 captioned, 0 failed, 3 skipped" in capsys.readouterr().err
    assert len(read_jsonl(out)) == 3


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_a_fifo_among_the_photos_never_hangs_the_gallery(tmp_path, make_images, tiny_checkpoint):
    make_images(2, "imgs")
    os.mkfifo(tmp_path / "imgs" / "pipe.jpg")  # no writer: opening it for reading blocks forever
    out = tmp_path / "gallery.html"
    proc = subprocess.run([sys.executable, "-m", "captioner", "caption", str(tmp_path / "imgs"), "--out", str(out),
                           "--checkpoint", str(tiny_checkpoint), "--workers", "0", "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "not a regular file" in proc.stderr and out.read_text().count("<img") == 2


def test_a_disk_full_from_the_start_is_one_line_and_exit_2(tmp_path, make_images, tiny_checkpoint, monkeypatch,
                                                           capsys):
    monkeypatch.chdir(tmp_path)
    make_images(2, "imgs")

    def full(self, records):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writers.RecordWriter, "write", full)
    assert caption("imgs", "--out", tmp_path / "o.jsonl", ckpt=tiny_checkpoint) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert err.count("error:") == 1
