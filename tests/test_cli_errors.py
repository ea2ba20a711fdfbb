"""Every subcommand: an error in the user's input is one line on stderr and exit 2; --debug shows the traceback."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from _service_util import ROOT


def cli(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "captioner", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def coco_captions(path):
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                "annotations": [{"id": 1, "image_id": 1, "caption": "a dog"}]}))
    return path


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_coco_file_without_dataset_coco_says_so_in_one_line(command, tmp_path):
    ann = coco_captions(tmp_path / "captions_val2017.json")
    extra = ["--output", tmp_path / "run"] if command == "train" else []
    r = cli(command, "--annotations", ann, "--images", tmp_path, *extra)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and len(lines) == 2, r.stderr
    assert "official COCO captions file" in lines[0] and "add --dataset coco" in lines[0]


def test_missing_annotations_file_and_debug_traceback(tmp_path):
    r = cli("train", "--annotations", tmp_path / "x.json", "--images", tmp_path, "--output", tmp_path / "run")
    assert r.returncode == 2 and "x.json: no such file" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = cli("train", "--annotations", tmp_path / "x.json", "--images", tmp_path, "--output", tmp_path / "run",
            "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr and "DatasetError" in r.stderr


def test_a_karpathy_file_given_as_coco_says_so(tmp_path):
    ann = tmp_path / "dataset_flickr8k.json"
    ann.write_text(json.dumps({"images": [{"filename": "a.jpg", "imgid": 0, "split": "val",
                                           "sentences": [{"raw": "a dog", "tokens": ["a", "dog"]}]}]}))
    r = cli("evaluate", "--dataset", "coco", "--annotations", ann, "--images", tmp_path)
    assert r.returncode == 2 and "add --dataset karpathy" in r.stderr and "Traceback" not in r.stderr, r.stderr
