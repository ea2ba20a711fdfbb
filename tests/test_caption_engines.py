"""The batch CLI's two engines behind one interface (captioner/cli/engine.py), and the one captioning loop they,
`captioner evaluate` and training's validation share (captioner/batch.py)."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from captioner.api import Captioner
from captioner.batch import caption_batches
from captioner.data import ImageDataset, collate
from captioner.generation import GenerationConfig
from captioner.preprocess import eval_transform

CLI = Path(__file__).resolve().parents[1] / "captioner" / "cli"


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            out |= {f"{'.' * node.level}{node.module or ''}"} | {f"{'.' * node.level}{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_the_engines_and_the_command_import_no_cycle():
    # the command picks an engine; an engine knows the interface module, not the command nor the other engine
    for engine, other in (("local_engine.py", ".ray_engine"), ("ray_engine.py", ".local_engine"), ("engine.py", None)):
        names = _imports(CLI / engine)
        assert not {".caption", "captioner.cli.caption", other} & names, engine


def test_both_engines_satisfy_the_interface(tiny_checkpoint):
    pytest.importorskip("ray", reason="Ray Data is not installed: pip install -e '.[ray]'")
    from captioner.cli.engine import Engine
    from captioner.cli.local_engine import LocalEngine
    from captioner.cli.ray_engine import RayEngine

    local = LocalEngine(Captioner.from_pretrained(tiny_checkpoint, device="cpu"), batch_size=2, workers=0)
    assert isinstance(local, Engine) and local.cfg is local.cap.cfg and local.precision == local.cap.precision
    for name in ("run", "close"):
        want = inspect.signature(getattr(Engine, name))
        assert inspect.signature(getattr(LocalEngine, name)) == want, name
        assert inspect.signature(getattr(RayEngine, name)) == want, name


def test_caption_batches_gives_what_the_api_gives(tiny_checkpoint, make_images, tmp_path, one_thread):
    paths = [str(p) for p in make_images(5)]
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    paths.insert(2, str(tmp_path / "bad.jpg"))
    cap = Captioner.from_pretrained(tiny_checkpoint, device="cpu")
    gen = GenerationConfig(beam_size=2, num_captions=2)
    ds = ImageDataset(paths, eval_transform(cap.cfg.preprocess), cap.cfg.preprocess.resize, warn=False)
    got = list(caption_batches(cap, DataLoader(ds, batch_size=3, collate_fn=collate), gen, progress=False))
    assert [b.indices for b in got] == [[0, 1], [3, 4, 5]]
    assert [i for b in got for i, _ in b.errors] == [2] and "bad.jpg" in got[0].errors[0][1]
    api = cap.caption([p for i, p in enumerate(paths) if i != 2], generation=gen)
    assert [[c.text for c in cs] for b in got for cs in b.captions] == [[c.text for c in cs] for cs in api]
    assert [t for b in got for _, t in b.best()] == [cs[0].text for cs in api]

    # features from elsewhere (training's cached features, blank features): captioned as given, and handed back
    seen = []

    def encode(batch):
        seen.append(batch["indices"].tolist())
        return cap.encode(batch["images"])

    again = list(caption_batches(cap, DataLoader(ds, batch_size=3, collate_fn=collate), gen, encode=encode,
                                 progress=False))
    assert seen == [[0, 1], [3, 4, 5]] and all(b.features is not None for b in again)
    assert [b.captions for b in again] == [b.captions for b in got]
    # a batch with no readable image is passed on, uncaptioned (its errors still count)
    empty = {"indices": torch.zeros(0, dtype=torch.long), "images": torch.zeros(0, 3, 32, 32), "errors": [(0, "x")]}
    (b,) = caption_batches(cap, [empty], gen, encode=encode, progress=False)
    assert (b.indices, b.captions, b.errors, b.features) == ([], [], [(0, "x")], None) and len(seen) == 2


def test_caption_batches_with_two_workers_runs_two_batches_at_once_and_keeps_the_order(tiny_checkpoint, make_images,
                                                                                        tmp_path):
    import threading

    paths = [str(p) for p in make_images(7)]
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    paths.insert(3, str(tmp_path / "bad.jpg"))
    cap = Captioner.from_pretrained(tiny_checkpoint, device="cpu")
    gen = GenerationConfig(beam_size=2)
    ds = ImageDataset(paths, eval_transform(cap.cfg.preprocess), cap.cfg.preprocess.resize, warn=False)
    one = list(caption_batches(cap, DataLoader(ds, batch_size=2, collate_fn=collate), gen, progress=False))

    meet, seen = threading.Barrier(2, timeout=10), []

    def encode(batch):
        first = int(batch["indices"][0])
        seen.append((first, torch.get_num_threads(), torch.is_inference_mode_enabled()))
        if first in (2, 4):  # the two batches after the first return only when both run at the same moment
            meet.wait()
        return cap.encode(batch["images"])

    with torch.inference_mode():
        two = list(caption_batches(cap, DataLoader(ds, batch_size=2, collate_fn=collate), gen, encode=encode,
                                   progress=False, workers=2, threads=1))
    assert [b.indices for b in two] == [b.indices for b in one] == [[0, 1], [2], [4, 5], [6, 7]]
    assert [b.errors for b in two] == [b.errors for b in one] and two[1].errors[0][0] == 3
    assert [[c.text for c in cs] for b in two for cs in b.captions] == \
        [[c.text for c in cs] for b in one for cs in b.captions]
    # the first batch alone on the caller's threads (its result comes as soon as with one worker); then the
    # workers, each with the threads asked for and the caller's inference mode
    assert seen[0] == (0, torch.get_num_threads(), True)
    assert {(t, mode) for first, t, mode in seen[1:]} == {(1, True)} and len(seen) == 4


def test_caption_command_writes_the_same_with_one_or_two_model_workers(tiny_checkpoint, make_images, tmp_path):
    from captioner.cli import main

    paths = [str(p) for p in make_images(9)]
    outs = []
    for n in (1, 2):
        out = tmp_path / f"w{n}.jsonl"
        assert main(["caption", *paths, "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--batch-size", "2",
                     "--workers", "0", "--model-workers", str(n), "--no-progress", "--device", "cpu"]) == 0
        outs.append(out.read_text())
    assert outs[0] == outs[1] and len(outs[0].splitlines()) == 9
    for bad in (["--model-workers", "0"], ["--model-workers", "2", "--engine", "ray"],
                ["--model-workers", "2", "--sample"]):
        assert main(["caption", *paths, "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "x.jsonl"),
                     *bad]) == 2, bad
    # sampling runs on one model worker (the default picks it): the same --seed gives the same captions
    sampled = []
    for k in range(2):
        out = tmp_path / f"s{k}.jsonl"
        assert main(["caption", *paths, "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--batch-size", "2",
                     "--workers", "0", "--sample", "--seed", "7", "--no-progress", "--device", "cpu"]) == 0
        sampled.append(out.read_text())
    assert sampled[0] == sampled[1]


def test_model_workers_keep_their_torch_threads_whatever_the_caller_sets_later(tiny_checkpoint, make_images):
    import threading

    cap = Captioner.from_pretrained(tiny_checkpoint, device="cpu")
    ds = ImageDataset([str(p) for p in make_images(3)], eval_transform(cap.cfg.preprocess), cap.cfg.preprocess.resize)
    flipped, seen = threading.Event(), {}

    def encode(batch):
        first = int(batch["indices"][0])
        if first == 1:  # the caller changes torch's count after this worker started, before its first torch op
            flipped.wait(10)
        seen[first] = torch.get_num_threads()
        return cap.encode(batch["images"])

    def loader():
        for b in DataLoader(ds, batch_size=1, collate_fn=collate):
            if int(b["indices"][0]) == 2:
                torch.set_num_threads(1)  # as captioner.cli.local_engine._fetch does around in-process preprocessing
                flipped.set()
            yield b

    n = torch.get_num_threads()
    try:
        got = list(caption_batches(cap, loader(), GenerationConfig(), encode=encode, progress=False, workers=2,
                                   threads=3))
    finally:
        torch.set_num_threads(n)
    assert [b.indices for b in got] == [[0], [1], [2]]
    assert seen[1] == seen[2] == 3


def test_the_local_engine_writes_a_small_first_batch_then_full_ones(tiny_checkpoint, make_images, tmp_path,
                                                                   one_thread):
    """The first records come after FIRST_BATCH images (one encoder chunk), not a whole --batch-size: the time to
    the first output is that of a few images. Every image is captioned once, in input order."""
    import json

    from captioner.cli.local_engine import FIRST_BATCH, FirstSmallBatches, LocalEngine
    from captioner.inputs import Item

    def batches(n, batch_size):
        sampler = FirstSmallBatches(n, batch_size)
        got = [list(b) for b in sampler]
        assert len(sampler) == len(got) and sum(got, []) == list(range(n))
        return got

    assert batches(30, 16) == [list(range(8)), list(range(8, 24)), list(range(24, 30))]
    assert batches(5, 16) == [list(range(5))] and batches(0, 16) == [] and batches(8, 16) == [list(range(8))]
    assert batches(9, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]  # a smaller --batch-size is kept
    assert len(FirstSmallBatches(10**9, 32)) == 1 + (10**9 - 8 + 31) // 32  # lazy: nothing per image up front
    paths = make_images(FIRST_BATCH + 12)
    todo = [(i, Item(str(p))) for i, p in enumerate(paths)]
    engine = LocalEngine(Captioner.from_pretrained(tiny_checkpoint, device="cpu"), batch_size=16, workers=1,
                         model_workers=1, progress=False)
    s = engine.run(todo, str(tmp_path / "out.jsonl"), GenerationConfig(beam_size=2))
    assert (s.first_done, s.done, s.failed) == (FIRST_BATCH, len(paths), 0)
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(len(paths)))
