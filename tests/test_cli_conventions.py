"""What a new user and an operator trip over: CLI conventions (--version, no abbreviations, a suggestion for a
typo, exit 2 for a mistyped folder, --out - for pipes, --no-progress everywhere) and a read-only filesystem."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile

import pytest

from captioner.cli import main as cli
from captioner.cli import parsers

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_version(capsys):
    assert cli(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("captioner ") and out.split()[1][0].isdigit()


@pytest.mark.parametrize("argv, hint", [(["--beam", "5"], "--beam-size"), (["--beam-szie", "5"], "--beam-size"),
                                        (["--no-progres"], "--no-progress")])
def test_abbreviations_are_refused_and_typos_get_one_line_with_a_suggestion(argv, hint, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["caption", "x.jpg", "--out", str(tmp_path / "o.jsonl"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"did you mean {hint}?" in err and "usage:" not in err and len(err.splitlines()) == 2


def test_every_command_refuses_abbreviations():
    for make in (parsers.train, parsers.train_vqa, parsers.distill, parsers.label, parsers.evaluate,
                 parsers.evaluate_vqa, parsers.make_vqa, parsers.caption, parsers.ask, parsers.export, parsers.merge,
                 parsers.serve):
        assert make().allow_abbrev is False, make().prog


def test_evaluate_has_no_progress_too():
    assert parsers.evaluate().parse_args(["--annotations", "a", "--images", "i", "--no-progress"]).no_progress
    assert parsers.evaluate_vqa().parse_args(["--no-progress"]).no_progress


def test_a_mistyped_folder_is_exit_2_and_writes_nothing(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "o.jsonl"
    code = cli(["caption", str(tmp_path / "phtos"), "--out", str(out), "--checkpoint", str(tiny_checkpoint)])
    assert code == 2 and not out.exists()
    assert "phtos: no such file or folder" in capsys.readouterr().err
    # a missing photo (an image name) is still an error record, like any unreadable image
    assert cli(["caption", str(tmp_path / "gone.jpg"), "--out", str(out), "--checkpoint", str(tiny_checkpoint),
                "--no-progress"]) == 1
    assert "no such file" in json.loads(out.read_text())["error"]


def test_out_dash_writes_jsonl_records_to_stdout(tmp_path, make_images, tiny_checkpoint):
    imgs = make_images(3, "imgs")
    proc = subprocess.run([sys.executable, "-m", "captioner", "caption", str(imgs[0].parent), "--out", "-",
                           "--checkpoint", str(tiny_checkpoint), "--workers", "0", "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(r["path"] for r in records) == sorted(map(str, imgs)) and all(r["captions"] for r in records)
    assert "3 captioned" in proc.stderr and not list(tmp_path.glob("-*")) and not (ROOT / "-").exists()
    assert cli(["caption", str(imgs[0]), "--out", "-", "--format", "html"]) == 2


def test_serve_without_a_writable_temp_dir_says_so_at_start_and_exits_2(tiny_checkpoint, monkeypatch, capsys):
    from captioner.cli import serve as serve_cli

    monkeypatch.setattr(tempfile, "tempdir", "/proc")  # as on a read-only root filesystem without --tmpfs /tmp
    args = parsers.serve().parse_args(["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--port", "0"])
    assert serve_cli.main(args) == 2
    err = capsys.readouterr().err
    assert "no writable temporary directory" in err and "--tmpfs /tmp" in err


def test_an_upload_that_cannot_be_spooled_is_503_not_500(tiny_checkpoint, monkeypatch):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings
    from _service_util import jpeg_bytes, wait_ready

    big = jpeg_bytes(1600, 1200, seed=1)  # over 1 MiB: Starlette spools it to a temporary file
    assert len(big) > 1 << 20
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint, device="cpu", max_delay_ms=1))) as c:
        wait_ready(c)
        monkeypatch.setattr(tempfile, "tempdir", "/proc")
        r = c.post("/v1/captions", files={"image": ("x.jpg", big, "image/jpeg")})
        assert r.status_code == 503 and "temporary" in r.json()["detail"], r.text
        monkeypatch.undo()
        assert c.post("/v1/captions", files={"image": ("x.jpg", big, "image/jpeg")}).status_code == 200


def test_ask_warns_about_words_the_model_does_not_know(tmp_path, make_images, capsys):
    from _service_util import tiny_vqa_checkpoint

    ckpt = tiny_vqa_checkpoint(tmp_path / "vqa")
    img = make_images(1)[0]
    assert cli(["ask", str(img), "--question", "is there a giraffe", "--choice", "a dog", "--choice", "a zebra",
                "--checkpoint", str(ckpt), "--device", "cpu"]) == 0
    assert "does not know 'is', 'there', 'giraffe', 'zebra'" in capsys.readouterr().err
    assert cli(["ask", str(img), "--question", "is there a giraffe", "--choice", "a dog", "--choice", "a zebra",
                "--checkpoint", str(ckpt), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unknown_words"] == ["is", "there", "giraffe", "zebra"]


def test_serve_on_an_unreadable_checkpoint_is_one_line_and_exit_2(tiny_checkpoint, monkeypatch, capsys):
    import errno
    import os

    from captioner import checkpoint
    from captioner.cli import serve as serve_cli

    def denied(path, *a, **k):  # as for a mounted folder owned by another user (root reads everything)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(checkpoint, "read_config", denied)
    args = parsers.serve().parse_args(["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--port", "0"])
    assert serve_cli.main(args) == 2
    err = capsys.readouterr().err
    assert "Permission denied" in err and len(err.strip().splitlines()) == 1
