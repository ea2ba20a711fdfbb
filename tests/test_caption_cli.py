"""``captioner caption`` / ``captioner merge``: inputs, outputs, resume after kill, bad files, shards, exit codes."""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from captioner.cli import main as cli
from captioner.inputs import Item, assign_image_ids, expand_inputs, parse_shard, shard
from captioner.cli.writers import read_records


def read_jsonl(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), "torn last line"
    return [json.loads(line) for line in data.decode().splitlines()]


def caption(*argv, ckpt=None, workers: int = 0) -> int:
    args = ["caption", *map(str, argv), "--workers", str(workers), "--no-progress"]
    if ckpt is not None:
        args += ["--checkpoint", str(ckpt)]
    return cli(args)


def popen_caption(argv: list, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "captioner", "caption", *map(str, argv), "--no-progress"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"captioner exited early ({proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no {n} records in {path} after {timeout} s")


# ---------------------------------------------------------------------------------------------- inputs


def test_expand_inputs_order_dedupe_and_filters(tmp_path, make_images, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_images(3, "a")
    make_images(2, "a/sub", prefix="s")
    (tmp_path / "a" / "UPPER.JPG").write_bytes((tmp_path / "a" / "img0.jpg").read_bytes())
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "._img0.jpg").write_bytes(b"resource fork")
    (tmp_path / "a" / ".cache").mkdir()
    (tmp_path / "a" / ".cache" / "t.jpg").write_bytes(b"x")
    make_images(2, "b", prefix="g")
    (tmp_path / "list.txt").write_text("# my list\n\nb/g1.jpg\n  a/img0.jpg  \nmissing.png\n")
    warnings = []
    items = expand_inputs(["a", "b/*.jpg", "@list.txt", "./a/img1.jpg", "empty*"], warn=warnings.append)
    assert [it.path for it in items] == [
        "a/UPPER.JPG", "a/img0.jpg", "a/img1.jpg", "a/img2.jpg", "a/sub/s0.jpg", "a/sub/s1.jpg",  # sorted walk
        "b/g0.jpg", "b/g1.jpg",  # glob; b/g1.jpg from the list is a duplicate, a/img0.jpg too
        "missing.png"]  # explicit paths are kept even when missing: they become error records
    assert any("empty*" in w for w in warnings)
    (tmp_path / "dirs.txt").write_text("a/sub\n")
    assert [it.path for it in expand_inputs(["@dirs.txt"])] == ["a/sub/s0.jpg", "a/sub/s1.jpg"]
    (tmp_path / "void").mkdir()
    warnings.clear()
    assert expand_inputs(["void"], warn=warnings.append) == [] and "no image files" in warnings[0]


def test_image_ids_shards_and_torn_lines(tmp_path):
    items = [Item("x/000000000139.jpg"), Item("COCO_val2014_000000000042.jpg"), Item("a/7.jpg"), Item("b/7.png"),
             Item("cat.jpg"), Item("ds.jpg", image_id="keep")]
    assign_image_ids(items)
    assert [it.image_id for it in items] == [139, 42, None, None, None, "keep"]  # 7 is ambiguous: path instead
    assert [p for p, _ in shard(items, 1, 4)] == [1, 5] and parse_shard(" 2/3 ") == (2, 3)
    for bad in ("3/3", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    f = tmp_path / "r.jsonl"
    f.write_bytes(b'{"path": "a.jpg", "captions": []}\n{"path": "b.j')
    assert [r["path"] for r in read_records(str(f)).records] == ["a.jpg"]
    assert f.stat().st_size > 40  # reading alone changes nothing
    rf = read_records(str(f), repair=True)
    assert rf.torn_bytes == len(b'{"path": "b.j') and f.read_bytes() == b'{"path": "a.jpg", "captions": []}\n'


# ---------------------------------------------------------------------------------------------- outputs


def test_folder_glob_list_to_jsonl_matches_api(tmp_path, make_images, tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_images(5, "photos")
    make_images(3, "photos/2024", prefix="p")
    make_images(4, "more", prefix="m")
    (tmp_path / "list.txt").write_text("more/m3.jpg\nphotos/img0.jpg\n")
    out = tmp_path / "out" / "caps.jsonl"
    code = caption("photos", "more/m[0-1].jpg", "@list.txt", "--out", out, "--batch-size", "3",
                   "--beam-size", "2", "--num-captions", "2", ckpt=tiny_checkpoint, workers=2)
    assert code == 0
    recs = read_jsonl(out)
    expected = [f"photos/img{i}.jpg" for i in range(5)] + [f"photos/2024/p{i}.jpg" for i in range(3)] + \
               ["more/m0.jpg", "more/m1.jpg", "more/m3.jpg"]
    expected = sorted(expected[:8]) + expected[8:]  # the folder walk is sorted as a whole
    assert [r["path"] for r in recs] == expected
    assert [r["index"] for r in recs] == list(range(len(expected)))
    for r in recs:
        assert "error" not in r and len(r["captions"]) == 2
        assert all(isinstance(c["caption"], str) and c["log_prob"] < 0 for c in r["captions"])
        assert r["captions"][0]["score"] >= r["captions"][1]["score"]
    # the loader pipeline gives exactly what the Python API gives for the same files
    from captioner.api import Captioner

    cap = Captioner.from_pretrained(tiny_checkpoint, device="cpu")
    api = cap.caption([str(tmp_path / p) for p in expected], beam_size=2, num_captions=2)
    assert [[c["caption"] for c in r["captions"]] for r in recs] == [[c.text for c in cs] for cs in api]
    cli_lp = [c["log_prob"] for r in recs for c in r["captions"]]
    assert cli_lp == pytest.approx([c.log_prob for cs in api for c in cs], abs=1e-3)
    # make_images restarts its random generator per call: the same pixels give the same scores, others differ
    by_content = {(tmp_path / r["path"]).read_bytes(): r["captions"][0]["log_prob"] for r in recs}
    assert len(set(by_content.values())) == len(by_content) == 5
    err = capsys.readouterr().err
    assert "11 images: 11 captioned, 0 failed, 0 skipped" in err and "images/s" in err


class _Gallery(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.figures, self.imgs, self.text, self._in = [], [], [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure":
            self.figures.append((a["data-path"], a["class"]))
        elif tag == "img":
            assert a["src"].startswith("data:image/jpeg;base64,")  # embedded: readable offline
            self.imgs.append(a["alt"])

    def handle_data(self, data):
        self.text.append(data)


def test_coco_results_and_html_gallery(tmp_path, make_images, tiny_checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = make_images(3, "val", prefix="00000000010")  # COCO-style names -> numeric image ids 100..102
    odd = tmp_path / "val" / "a<b>&'q.jpg"
    odd.write_bytes(paths[0].read_bytes())
    (tmp_path / "val" / "broken.jpg").write_text("text, not JPEG")
    res = tmp_path / "res.json"
    assert caption("val", "--out", res, ckpt=tiny_checkpoint) == 1  # broken.jpg failed
    from training.metrics import read_results  # what `captioner evaluate --results` reads

    preds = read_results(res)
    assert sorted(preds, key=str) == [100, 101, 102, "val/a<b>&'q.jpg"]
    assert all(isinstance(c, str) and c for c in preds.values())
    # the JSONL records beside it are the resumable source of truth
    recs = read_jsonl(tmp_path / "res.json.records.jsonl")
    assert len(recs) == 5 and sum("error" in r for r in recs) == 1

    gallery = tmp_path / "gallery.html"
    assert caption("val", "--out", gallery, ckpt=tiny_checkpoint, workers=1) == 1
    raw = gallery.read_text()
    assert "<b>" not in raw and "a&lt;b&gt;&amp;" in raw  # escaped
    g = _Gallery()
    g.feed(raw)
    rec_paths = [r["path"] for r in read_jsonl(tmp_path / "gallery.html.records.jsonl")]
    assert [p for p, _ in g.figures] == rec_paths and len(rec_paths) == 5
    assert sorted(g.imgs) == sorted(p for p in rec_paths if "broken" not in p)  # a thumbnail per readable image
    assert dict(g.figures)["val/broken.jpg"] == "item error"
    text = " ".join(g.text)
    assert "not a recognised image format" in text
    assert all(c in text for c in preds.values())


def test_bad_files_become_error_records(tmp_path, make_images, tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    good = make_images(4, "imgs", size=(200, 160))
    truncated = tmp_path / "imgs" / "truncated.jpg"
    truncated.write_bytes(good[0].read_bytes()[:600])
    renamed = tmp_path / "imgs" / "really_text.jpg"
    renamed.write_text("hello\n" * 50)
    notes = tmp_path / "notes.txt"
    notes.write_text("explicit non-image")
    out = tmp_path / "o.jsonl"
    code = caption("imgs", "gone.jpg", notes.name, "--out", out, "--batch-size", "2", ckpt=tiny_checkpoint, workers=2)
    assert code == 1
    recs = {r["path"]: r for r in read_jsonl(out)}
    assert len(recs) == 8
    errors = {p: r["error"] for p, r in recs.items() if "error" in r}
    assert set(errors) == {"imgs/truncated.jpg", "imgs/really_text.jpg", "gone.jpg", "notes.txt"}
    assert "truncated" in errors["imgs/truncated.jpg"] and "no such file" in errors["gone.jpg"]
    assert "not a recognised image format" in errors["imgs/really_text.jpg"]
    assert all(recs[f"imgs/img{i}.jpg"]["captions"] for i in range(4))
    assert "4 captioned, 4 failed" in capsys.readouterr().err
    # a re-run has nothing left to do but still reports the failures; --retry-errors tries them again
    assert caption("imgs", "gone.jpg", notes.name, "--out", out, ckpt=tiny_checkpoint) == 1
    assert "0 captioned, 0 failed, 8 skipped" in capsys.readouterr().err
    renamed.write_bytes(good[1].read_bytes())  # fixed meanwhile
    assert caption("imgs", "gone.jpg", notes.name, "--out", out, "--retry-errors", ckpt=tiny_checkpoint) == 1
    recs = read_jsonl(out)
    assert len(recs) == 8 and len({r["path"] for r in recs}) == 8
    assert "captions" in next(r for r in recs if r["path"] == "imgs/really_text.jpg")


# ---------------------------------------------------------------------------------------------- scale out


def test_two_shards_merged_equal_one_run(tmp_path, make_images, tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_images(7, "imgs")
    (tmp_path / "imgs" / "bad.jpg").write_text("x")
    assert caption("imgs", "--out", "all.jsonl", ckpt=tiny_checkpoint) == 1
    for i in (1, 0):
        assert caption("imgs", "--out", "sh.jsonl", "--shard", f"{i}/2", "--batch-size", "2", ckpt=tiny_checkpoint) == \
            (1 if i == 0 else 0)  # bad.jpg is item 0 -> shard 0
    assert "captioner merge --out sh.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "sh.jsonl").exists()
    assert cli(["merge", "--out", "sh.jsonl"]) == 0
    assert read_jsonl(tmp_path / "sh.jsonl") == read_jsonl(tmp_path / "all.jsonl")
    # the same parts as COCO results, listed explicitly
    parts = [f"sh.jsonl.shard{i}-of-2.jsonl" for i in range(2)]
    assert cli(["merge", *parts, "--out", "sh.json"]) == 0
    assert [r["caption"] for r in json.loads((tmp_path / "sh.json").read_text())] == \
           [r["captions"][0]["caption"] for r in read_jsonl(tmp_path / "all.jsonl") if "captions" in r]
    os.remove(parts[1])
    assert cli(["merge", "--out", "sh.jsonl"]) == 2
    assert "1 of 2 parts missing" in capsys.readouterr().err


def test_torchrun_ranks_shard_and_merge(tmp_path, make_images, tiny_checkpoint):
    make_images(6, "imgs")
    assert caption(tmp_path / "imgs", "--out", tmp_path / "one.jsonl", ckpt=tiny_checkpoint) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "captioner", "caption", "imgs", "--out", "tr.jsonl", "--checkpoint", str(tiny_checkpoint),
                        "--workers", "0", "--no-progress", "--device", "cpu"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "merged 2 parts: 6 images" in p.stderr
    assert (tmp_path / "tr.jsonl.shard1-of-2.jsonl").exists()
    one = read_jsonl(tmp_path / "one.jsonl")
    assert read_jsonl(tmp_path / "tr.jsonl") == [{**r, "path": r["path"].replace(str(tmp_path) + "/", "")} for r in one]


# ---------------------------------------------------------------------------------------------- resume, signals


def test_resume_after_sigkill(tmp_path, make_images, tiny_checkpoint, monkeypatch, capsys):
    n = 40
    make_images(n, "imgs")
    out = tmp_path / "o.jsonl"
    argv = ["imgs", "--out", out, "--checkpoint", tiny_checkpoint, "--batch-size", "1", "--workers", "1",
            "--max-length", "16"]  # slow on purpose: the kill must land mid-run
    proc = popen_caption(argv, tmp_path)
    wait_for_lines(out, 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    before = out.read_bytes()
    whole = before[: before.rfind(b"\n") + 1]
    n_before = whole.count(b"\n")
    assert 4 <= n_before < n, "the run finished before the kill: the test did not test resume"
    with out.open("ab") as f:  # a kill during a write leaves a torn line: make sure there is one
        f.write(b'{"path": "imgs/img39.jpg", "capt')
    monkeypatch.chdir(tmp_path)  # the same command again (in-process: saves a Python start-up)
    assert cli(["caption", *map(str, argv), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "removed a partial last line" in err and f"{n_before} skipped as already done" in err
    data = out.read_bytes()
    assert data.startswith(whole)  # records already written are never rewritten
    recs = read_jsonl(out)
    assert sorted(r["path"] for r in recs) == sorted(f"imgs/img{i}.jpg" for i in range(n))  # each exactly once
    assert [r["index"] for r in recs] == list(range(n)) and all(r["captions"] for r in recs)


def test_ctrl_c_finishes_the_batch_and_exits_130(tmp_path, make_images, tiny_checkpoint):
    make_images(40, "imgs")
    out = tmp_path / "o.html"
    records = tmp_path / "o.html.records.jsonl"
    proc = popen_caption(["imgs", "--out", out, "--checkpoint", tiny_checkpoint, "--batch-size", "2",
                          "--workers", "2", "--max-length", "40"], tmp_path)
    wait_for_lines(records, 2, proc)
    os.killpg(proc.pid, signal.SIGINT)  # like Ctrl-C in a terminal: the loader workers get it too
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopped by SIGINT" in err and "re-run the same command" in err and "Traceback" not in err
    recs = read_jsonl(records)  # whole lines only
    assert 2 <= len(recs) < 40 and len(recs) % 2 == 0  # whole batches
    assert not out.exists()  # no partial gallery: the final file appears when the run is complete


# ---------------------------------------------------------------------------------------------- exit codes, dataset


def test_exit_codes(tmp_path, make_images, tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_images(2, "imgs")
    (tmp_path / "void").mkdir()
    ok = ["imgs", "--out", "o.jsonl"]
    assert caption(*ok, ckpt=tiny_checkpoint) == 0
    usage = {
        "nothing to caption": ["--out", "o.jsonl"],
        "no images found": ["void", "--out", "v.jsonl"],
        "cannot tell the output format": ["imgs", "--out", "o.txt"],
        "--shard must look like": ["imgs", "--out", "o.jsonl", "--shard", "2"],
        "num_captions (4) must be at most beam_size (3)": ["imgs", "--out", "o.jsonl", "--num-captions", "4"],
        "--dataset needs --annotations": ["--dataset", "coco", "--out", "o.json"],
        "list file nolist.txt: no such file": ["@nolist.txt", "--out", "o.jsonl"],
        "is a folder": ["imgs", "--out", "void"],
    }
    for msg, argv in usage.items():
        assert caption(*argv, ckpt=tiny_checkpoint) == 2, msg
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: missing --out
        caption("imgs", ckpt=tiny_checkpoint)
    assert e.value.code == 2
    import captioner.api

    def oom(self, *a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with monkeypatch.context() as m:
        m.setattr(captioner.api.Captioner, "caption_batch", oom)
        assert caption("imgs", "--out", "oom.jsonl", ckpt=tiny_checkpoint) == 4
    assert "try a smaller --batch-size" in capsys.readouterr().err
    monkeypatch.setattr(captioner.api, "default_checkpoint", lambda: tmp_path / "no-model")
    assert caption(*ok) == 3
    assert "no --checkpoint given and no default model installed at" in capsys.readouterr().err
    (tmp_path / "broken-ckpt").mkdir()
    assert caption(*ok, ckpt=tmp_path / "broken-ckpt") == 3
    assert "cannot load the model" in capsys.readouterr().err


def test_the_plan_is_checked_before_anything_is_written(tmp_path, make_images, tiny_checkpoint, monkeypatch, capsys):
    from captioner.cli import parsers
    from captioner.cli.caption import Plan, _plan
    from captioner.cli.engine import UsageError

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    make_images(1, "imgs")
    plan = _plan(parsers.caption().parse_args(["imgs", "--out", "o.html", "--shard", "1/2", "--device", "cpu"]))
    assert isinstance(plan, Plan) and (plan.fmt, plan.shard, plan.world) == ("html", (1, 2), 1)
    assert plan.tag == "shard 1/2" and plan.device == torch.device("cpu")
    with pytest.raises(UsageError, match="--batch-size must be >= 1"):
        _plan(parsers.caption().parse_args(["imgs", "--out", "o.jsonl", "--batch-size", "0"]))
    # a missing input folder: one line, exit 2, and no record file, options file or output left behind
    assert caption("imgs", "nowhere", "--out", tmp_path / "out" / "o.html", ckpt=tiny_checkpoint) == 2
    err = capsys.readouterr().err
    assert err.strip() == "captioner caption: error: input nowhere: no such file or folder"
    assert not (tmp_path / "out").exists()


def test_karpathy_dataset_results_feed_evaluate(tmp_path, make_images, tiny_checkpoint):
    make_images(3, "flickr/Images", prefix="f")
    ann = tmp_path / "dataset_tiny.json"
    sents = lambda *s: [{"raw": x, "tokens": x.split()} for x in s]  # noqa: E731
    ann.write_text(json.dumps({"dataset": "flickr8k", "images": [
        {"filepath": "Images", "filename": "f0.jpg", "imgid": 10, "split": "test",
         "sentences": sents("a dog runs", "a dog")},
        {"filepath": "Images", "filename": "f1.jpg", "imgid": 11, "split": "train", "sentences": sents("a cat")},
        {"filepath": "Images", "filename": "f2.jpg", "imgid": 12, "split": "test", "sentences": sents("two people")},
    ]}))
    res = tmp_path / "res.json"
    ds = ["--dataset", "karpathy", "--annotations", ann, "--images", tmp_path / "flickr", "--split", "test"]
    assert caption(*ds, "--out", res, ckpt=tiny_checkpoint) == 0
    rows = json.loads(res.read_text())
    assert [r["image_id"] for r in rows] == [10, 12] and all(r["caption"] for r in rows)
    recs = read_jsonl(tmp_path / "res.json.records.jsonl")
    assert [r["image_id"] for r in recs] == [10, 12] and recs[0]["path"].endswith("Images/f0.jpg")
    metrics = tmp_path / "m.json"
    assert cli(["evaluate", "--results", str(res), *map(str, ds), "--no-java", "--metrics-out", str(metrics)]) == 0
    assert "CIDEr-D" in json.loads(metrics.read_text())
    assert caption("imgs", *ds, "--out", res, ckpt=tiny_checkpoint) == 2  # INPUT and --dataset: usage error


@pytest.mark.parametrize("preset, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_idle_openmp_threads_sleep_unless_the_user_says_otherwise(preset, expected):
    # loader workers decode on the cores torch computes on; spinning OpenMP threads would take them (see README)
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = "import captioner, os, sys; sys.stdout.write(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected


class _Niceness(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        return os.nice(0)


@pytest.mark.parametrize("device, env, lowered", [("cpu", None, 19), ("cuda", None, 0), ("cpu", "5", 5),
                                                  ("cpu", "0", 0)])
def test_cpu_runs_lower_the_loader_priority(device, env, lowered, monkeypatch):
    # on a CPU run the model is the bottleneck: the loader decodes in its gaps instead of preempting it (README)
    from captioner.cli.local_engine import _worker_init, loader_nice

    monkeypatch.delenv("CAPTIONER_LOADER_NICE", raising=False)
    if env is not None:
        monkeypatch.setenv("CAPTIONER_LOADER_NICE", env)
    base = os.nice(0)
    dl = torch.utils.data.DataLoader(_Niceness(), batch_size=None, num_workers=1,
                                     worker_init_fn=functools.partial(_worker_init, loader_nice(torch.device(device))))
    assert list(dl) == [min(19, base + lowered)] * 2
    assert os.nice(0) == base  # the main process keeps its priority


def test_bad_loader_nice_is_a_usage_error(tmp_path, make_images, tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_images(1, "imgs")
    monkeypatch.setenv("CAPTIONER_LOADER_NICE", "-5")
    assert caption("imgs", "--out", "o.jsonl", ckpt=tiny_checkpoint) == 2
    assert "CAPTIONER_LOADER_NICE must be 0..19" in capsys.readouterr().err


def test_rerun_with_other_options_is_refused_unless_asked(tmp_path, make_images, tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_images(3)
    out = tmp_path / "caps.jsonl"
    assert caption("images", "--out", out, ckpt=tiny_checkpoint) == 0
    first = read_jsonl(out)
    assert all(len(r["captions"]) == 1 for r in first)
    capsys.readouterr()
    # the review's case: a rerun asking for 3 captions with beam 5 must not report "skipped as already done"
    assert caption("images", "--out", out, "--beam-size", "5", "--num-captions", "3", ckpt=tiny_checkpoint) == 2
    err = capsys.readouterr().err
    assert "beam_size 3 -> 5" in err and "num_captions 1 -> 3" in err and "--restart" in err
    assert read_jsonl(out) == first  # nothing was touched
    assert caption("images", "--out", out, "--beam-size", "5", "--num-captions", "3", "--resume-anyway",
                   ckpt=tiny_checkpoint) == 0
    assert "skipped as already done" in capsys.readouterr().err
    assert caption("images", "--out", out, "--beam-size", "5", "--num-captions", "3", "--restart",
                   ckpt=tiny_checkpoint) == 0
    assert all(len(r["captions"]) == 3 for r in read_jsonl(out))
    assert caption("images", "--out", out, "--beam-size", "5", "--num-captions", "3", ckpt=tiny_checkpoint) == 0


def test_options_files_from_before_generation_config_are_read(tmp_path):
    from captioner.cli.caption import check_options
    from captioner.generation import GenerationConfig

    records = tmp_path / "caps.jsonl"
    records.write_text('{"path": "a.jpg"}\n')
    old = {**GenerationConfig().to_dict(), "do_sample": True, "return_attention": False}
    del old["sample"], old["attention"]
    Path(str(records) + ".options.json").write_text(json.dumps(old))
    sampled = GenerationConfig(sample=True).to_dict()
    assert check_options(str(records), sampled, anyway=False) is None  # the same options, in their old names
    refused = check_options(str(records), GenerationConfig().to_dict(), anyway=False)
    assert refused and "sample True -> False" in refused


def test_unreadable_inputs_are_named_on_stderr(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert caption("no_such.jpg", "--out", tmp_path / "x.jsonl", ckpt=tiny_checkpoint) == 1
    err = capsys.readouterr().err
    assert "skipped no_such.jpg: no such file" in err and "1 failed" in err
