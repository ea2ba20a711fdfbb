"""``captioner caption --engine ray`` and captioner.ray.caption_dataset on a local Ray cluster (2 CPUs): the same
captions as the local engine, unreadable images as error records, resume, Parquet/COCO outputs, option errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray Data is not installed: pip install -e '.[ray]'")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed (it comes with ray[data])")

from PIL import Image, ImageOps  # noqa: E402

import captioner.ray as cray  # noqa: E402
from captioner.api import default_checkpoint  # noqa: E402
from captioner.cli import main as cli  # noqa: E402
from captioner.generation import GenerationConfigError  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "service" / "static" / "samples"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module: starting one costs seconds."""
    if ray.is_initialized():
        ray.shutdown()
    cray.init(num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """20 files: 19 distinct photos (the 3 shipped samples, flipped, cropped, rescaled) and 1 unreadable one."""
    folder = tmp_path_factory.mktemp("photos")
    n = 0
    for src in sorted(SAMPLES.glob("*.jpg")):
        im = Image.open(src).convert("RGB")
        w, h = im.size
        variants = [im, ImageOps.mirror(im), im.crop((0, 0, w * 2 // 3, h * 2 // 3)),
                    im.crop((w // 3, h // 3, w, h)), im.crop((w // 6, 0, w * 5 // 6, h)),
                    im.resize((w // 2, h // 2)), ImageOps.flip(im)]
        for v in variants:
            if n < 19:
                v.save(folder / f"photo{n:02d}.jpg", quality=90)
                n += 1
    (folder / "photo19.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # sorts last, among the photos
    return folder


def caption(*argv, engine: str = "local") -> int:
    extra = ["--engine", "ray"] if engine == "ray" else ["--workers", "0"]
    return cli(["caption", *map(str, argv), "--no-progress", *extra])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_path(records: list[dict]) -> dict[str, dict]:
    return {r["path"]: r for r in records}


def test_ray_engine_captions_like_the_local_engine_and_resumes(cluster, photos, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(photos.parent)
    local, rayed = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert caption(photos.name, "--out", local) == 1  # 1: some images failed
    assert caption(photos.name, "--out", rayed, engine="ray") == 1
    err = capsys.readouterr().err
    assert "ray: cluster at" in err and "20 images: 19 captioned, 1 failed" in err
    a, b = by_path(read_jsonl(local)), by_path(read_jsonl(rayed))
    assert len(a) == len(b) == 20 and a.keys() == b.keys()
    assert all(p.startswith(photos.name + "/") for p in b)  # as the user spelled them, not absolute
    errors = [r for r in b.values() if "error" in r]
    assert len(errors) == 1 and errors[0]["path"] == f"{photos.name}/photo19.jpg"
    assert errors[0]["error"] == a[errors[0]["path"]]["error"]
    assert f"skipped {photos.name}/photo19.jpg" in err  # named on stderr as the user spelled it
    for path, r in a.items():
        if "error" in r:
            continue
        assert [c["caption"] for c in b[path]["captions"]] == [c["caption"] for c in r["captions"]], path
        assert b[path]["captions"][0]["log_prob"] == pytest.approx(r["captions"][0]["log_prob"], abs=2e-3)
        assert {k: v for k, v in b[path].items() if k != "captions"} == {k: v for k, v in r.items() if k != "captions"}
    assert len({r["captions"][0]["caption"] for r in b.values() if "captions" in r}) > 3  # not one caption for all

    before = rayed.read_bytes()
    assert caption(photos.name, "--out", rayed, engine="ray") == 1  # the error record still counts
    err = capsys.readouterr().err
    assert "20 images: 0 captioned, 0 failed, 20 skipped as already done" in err
    assert rayed.read_bytes() == before


def test_killed_driver_then_rerun_captions_each_image_once(cluster, photos, tmp_path, monkeypatch, capsys):
    """kill -9 of the driver mid-job: the records keep the batches that reached them, the same command does the rest."""
    many = tmp_path / "many"
    for k in range(4):
        (many / f"copy{k}").mkdir(parents=True)
        for p in sorted(photos.iterdir()):
            (many / f"copy{k}" / p.name).symlink_to(p)
    out = tmp_path / "caps.jsonl"
    argv = [sys.executable, "-m", "captioner", "caption", str(many), "--out", str(out), "--engine", "ray",
            "--batch-size", "4", "--no-progress"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_ADDRESS": ""},  # its own local cluster, as a user's first run
                            start_new_session=True)
    t0 = time.time()
    while not (out.exists() and out.read_bytes().count(b"\n") >= 8):
        if proc.poll() is not None:
            pytest.fail(f"captioner exited early ({proc.returncode}): {proc.stderr.read()}")
        if time.time() - t0 > 120:
            proc.kill()
            pytest.fail("no records after 120 s")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # the driver alone, as `kill -9 PID`
    proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the orphans of its local cluster (`ray stop` would end them too)
    except ProcessLookupError:
        pass
    before = len(out.read_bytes().splitlines())
    assert 8 <= before < 80
    monkeypatch.chdir(tmp_path)
    assert caption(many, "--out", out, "--batch-size", 4, engine="ray") == 1  # 4 unreadable copies
    err = capsys.readouterr().err
    assert "80 images: " in err and f"{before} skipped as already done" in err
    recs = read_jsonl(out)
    assert sorted(r["path"] for r in recs) == sorted(str(p) for p in many.rglob("*.jpg"))  # each exactly once
    assert sum("error" in r for r in recs) == 4


def test_parquet_and_coco_outputs(cluster, photos, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(photos.parent)
    for engine in ("local", "ray"):
        out = tmp_path / f"{engine}.parquet"
        assert caption(photos.name, "--out", out, "--num-captions", 2, engine=engine) == 1
        table = pq.read_table(out)
        assert table.column_names == ["path", "image_id", "index", "captions", "error"]
        rows = table.to_pylist()
        assert [r["index"] for r in rows] == list(range(20))  # input order, whatever order batches finished in
        assert [r["error"] is None for r in rows] == [True] * 19 + [False]
        assert rows[-1]["captions"] is None and "photo19.jpg" in rows[-1]["error"]
        assert all(len(r["captions"]) == 2 and r["captions"][0]["score"] >= r["captions"][1]["score"]
                   for r in rows[:19])
        if engine == "local":
            local_rows = rows
    assert [[c["caption"] for c in r["captions"] or []] for r in rows] == \
        [[c["caption"] for c in r["captions"] or []] for r in local_rows]

    coco = tmp_path / "ray.json"
    assert caption(photos.name, "--out", coco, engine="ray") == 1
    results = json.loads(coco.read_text())
    assert len(results) == 19 and {"image_id", "caption"} <= set(results[0])


def test_caption_dataset_reads_bytes_columns(cluster, photos, tmp_path, monkeypatch, capsys):
    """The Python entry point, as a user's own pipeline calls it: images read as bytes (object storage), the
    input's other columns kept, the output written as Parquet."""
    monkeypatch.chdir(photos.parent)
    local = tmp_path / "local.jsonl"
    caption(photos.name, "--out", local)
    want = {Path(r["path"]).name: r.get("captions", [{}])[0].get("caption") for r in read_jsonl(local)}

    ds = ray.data.read_binary_files(str(photos), include_paths=True)
    out = cray.caption_dataset(ds, beam_size=3, batch_size=8)
    rows = out.take_all()
    assert all({"path", "captions", "error"} <= set(r) and "bytes" not in r for r in rows)
    got = {Path(r["path"]).name: (r["captions"][0]["caption"] if r["error"] is None else None) for r in rows}
    assert got == want
    bad = [r for r in rows if r["error"] is not None]
    assert len(bad) == 1 and "photo19.jpg" in bad[0]["error"] and bad[0]["captions"] is None

    out.write_parquet(str(tmp_path / "pq"))
    assert pq.read_table(tmp_path / "pq").num_rows == 20


def test_caption_dataset_checks_its_arguments_on_the_driver(cluster, tmp_path):
    ds = ray.data.from_items([{"path": "x.jpg"}])
    with pytest.raises(GenerationConfigError, match="unknown generation options \\['beam_width'\\]"):
        cray.caption_dataset(ds, beam_width=3)
    with pytest.raises(GenerationConfigError, match="num_captions"):
        cray.caption_dataset(ds, beam_size=2, num_captions=3)
    with pytest.raises(ValueError, match="'path' column"):
        cray.caption_dataset(ray.data.from_items([{"file": "x.jpg"}]))
    with pytest.raises(ValueError, match="no attention decoder"):
        cray.caption_dataset(ds, attention=True)
    with pytest.raises(ValueError, match="concurrency"):
        cray.caption_dataset(ds, concurrency=(3, 2))
    (tmp_path / "config.json").write_text("{}")
    from captioner.checkpoint import CheckpointError

    with pytest.raises(CheckpointError):
        cray.caption_dataset(ds, checkpoint=tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["--engine", "ray", "--shard", "0/2"], "no --shard"),
    (["--engine", "ray", "--concurrency", "two"], "--concurrency must be N or MIN-MAX"),
    (["--engine", "ray", "--concurrency", "3-1"], "1 <= MIN <= MAX"),
    (["--engine", "ray", "--device", "cuda:1"], "--device cpu or cuda"),
    (["--engine", "ray", "--device", "cuda"], "has no GPUs"),
    (["--engine", "ray", "--workers", "0"], "--workers must be >= 1"),
    (["--concurrency", "2"], "options of --engine ray"),
    (["--num-gpus", "1"], "options of --engine ray"),
])
def test_engine_option_errors_are_usage_errors(cluster, photos, tmp_path, argv, message, capsys):
    assert default_checkpoint().exists()
    code = cli(["caption", str(photos), "--out", str(tmp_path / "o.jsonl"), "--no-progress", *argv])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists() or (tmp_path / "o.jsonl").read_bytes() == b""
