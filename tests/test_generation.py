"""GenerationConfig: defaults, validation, JSON, and one set of rules and names behind the API, the CLI and REST."""
from __future__ import annotations

import base64
import io
import json
from dataclasses import FrozenInstanceError

import pytest
from PIL import Image

from captioner.cli import parsers
from captioner.generation import OPTIONS, GenerationConfig, GenerationConfigError, with_options

RULE = "num_captions (3) must be at most beam_size (2) unless sample is true"


def test_defaults_are_what_every_entry_point_had():
    assert GenerationConfig().to_dict() == {
        "beam_size": 3, "num_captions": 1, "max_length": None, "length_penalty": 0.0, "block_trigrams": False,
        "sample": False, "temperature": 1.0, "top_k": 0, "attention": False}
    # the CLI's flags are the fields, with their defaults
    assert GenerationConfig.from_args(parsers.caption().parse_args(["x", "--out", "o.jsonl"])) == GenerationConfig()
    args = parsers.caption().parse_args(["x", "--out", "o.jsonl", "--beam-size", "5", "--num-captions", "2",
                                         "--length-penalty", "0.5", "--block-trigrams", "--attention"])
    assert GenerationConfig.from_args(args) == GenerationConfig(beam_size=5, num_captions=2, length_penalty=0.5,
                                                                block_trigrams=True, attention=True)


@pytest.mark.parametrize("options, field, message", [
    ({"beam_size": 0}, "beam_size", "beam_size must be >= 1, got 0"),
    ({"beam_size": 2.5}, "beam_size", "beam_size must be an integer, got 2.5"),
    ({"beam_size": True}, "beam_size", "beam_size must be an integer, got True"),
    ({"num_captions": 0}, "num_captions", "num_captions must be >= 1, got 0"),
    ({"beam_size": 2, "num_captions": 3}, "num_captions", RULE),
    ({"max_length": 0}, "max_length", "max_length must be >= 1, got 0"),
    ({"max_length": "8"}, "max_length", "max_length must be an integer or None, got '8'"),
    ({"length_penalty": float("nan")}, "length_penalty", "length_penalty must be a finite number, got nan"),
    ({"block_trigrams": 1}, "block_trigrams", "block_trigrams must be true or false, got 1"),
    ({"sample": "yes"}, "sample", "sample must be true or false, got 'yes'"),
    ({"sample": True, "temperature": 0}, "temperature", "temperature must be > 0, got 0.0"),
    ({"temperature": float("inf")}, "temperature", "temperature must be a finite number, got inf"),
    ({"top_k": -1}, "top_k", "top_k must be >= 0, got -1"),
    ({"attention": None}, "attention", "attention must be true or false, got None"),
])
def test_invalid_options_name_their_field(options, field, message):
    with pytest.raises(GenerationConfigError) as e:
        GenerationConfig(**options)
    assert e.value.field == field and str(e.value).startswith(message)
    assert isinstance(e.value, ValueError)


def test_sampling_lifts_the_beam_rule_and_numbers_are_normalised():
    assert GenerationConfig(beam_size=2, num_captions=5, sample=True).num_captions == 5
    np = pytest.importorskip("numpy")
    g = GenerationConfig(beam_size=np.int64(4), temperature=1, length_penalty=np.float32(0.5))
    assert type(g.beam_size) is int and type(g.temperature) is float and g.length_penalty == 0.5
    same = GenerationConfig(beam_size=4, length_penalty=0.5)
    assert g == same and hash(g) == hash(same) and json.dumps(g.to_dict()) == json.dumps(same.to_dict())
    with pytest.raises(FrozenInstanceError):
        g.beam_size = 5


def test_json_round_trip_and_unknown_keys():
    g = GenerationConfig(beam_size=5, num_captions=3, max_length=12, length_penalty=0.7, block_trigrams=True,
                         attention=True)
    assert GenerationConfig.from_dict(json.loads(json.dumps(g.to_dict()))) == g
    assert GenerationConfig.from_dict({}) == GenerationConfig()
    with pytest.raises(GenerationConfigError, match=r"unknown generation options \['beam_width', 'n'\]") as e:
        GenerationConfig.from_dict({"beam_width": 3, "n": 2, "beam_size": 3})
    assert e.value.field == "beam_width"
    with pytest.raises(GenerationConfigError, match="must be a mapping"):
        GenerationConfig.from_dict([("beam_size", 3)])


def test_replace_validates_like_the_constructor():
    g = GenerationConfig(beam_size=4, num_captions=4)
    assert g.replace(num_captions=2) == GenerationConfig(beam_size=4, num_captions=2)
    with pytest.raises(GenerationConfigError, match=r"num_captions \(4\) must be at most beam_size \(2\)"):
        g.replace(beam_size=2)
    with pytest.raises(GenerationConfigError, match="unknown generation options"):
        g.replace(do_sample=True)  # the old internal name is not an option


def test_canonical_merges_configs_that_give_the_same_captions():
    samples = GenerationConfig(sample=True, num_captions=2, temperature=0.7)
    assert samples.replace(beam_size=4, length_penalty=1.0, block_trigrams=True).canonical() == samples.canonical()
    assert GenerationConfig(beam_size=3, temperature=0.5, top_k=4).canonical() == GenerationConfig().canonical()
    greedy = GenerationConfig(beam_size=1)
    assert greedy.replace(length_penalty=1.0, block_trigrams=True).canonical() == greedy.canonical()
    # ... and keeps apart those that do not
    assert GenerationConfig(length_penalty=1.0).canonical() != GenerationConfig().canonical()
    assert GenerationConfig(attention=True).canonical() != GenerationConfig().canonical()


def test_keyword_shortcuts():
    base = GenerationConfig(beam_size=5)
    assert with_options(None, {}) == GenerationConfig() and with_options(base, {}) is base
    assert with_options(base, {"num_captions": 2}) == GenerationConfig(beam_size=5, num_captions=2)
    # the names from before GenerationConfig are gone: one name per option
    with pytest.raises(GenerationConfigError, match=r"unknown generation options \['do_sample'\]"):
        with_options(None, {"do_sample": True})
    with pytest.raises(GenerationConfigError, match="generation must be a GenerationConfig, got int"):
        with_options(5, {})
    with pytest.raises(GenerationConfigError, match=r"unknown generation options \['beam_width'\]"):
        with_options(None, {"beam_width": 3})


def test_every_option_is_a_cli_flag_and_a_request_field():
    pytest.importorskip("fastapi", reason="service extra not installed (pip install -e '.[serve]')")
    from service.schemas import CaptionParams

    flags = {o for a in parsers.caption()._actions for o in a.option_strings}
    assert {"--" + name.replace("_", "-") for name in OPTIONS} <= flags
    assert set(CaptionParams.model_fields) == set(OPTIONS)


# ----------------------------------------------------------------------------- the same rule, everywhere


@pytest.fixture
def client(tiny_checkpoint):
    pytest.importorskip("fastapi", reason="service extra not installed (pip install -e '.[serve]')")
    from fastapi.testclient import TestClient

    from _service_util import wait_ready
    from service.app import create_app
    from service.settings import Settings

    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint, device="cpu", max_delay_ms=0))) as c:
        wait_ready(c)
        yield c


def _jpeg() -> bytes:
    from _service_util import jpeg_bytes

    return jpeg_bytes()


def _post(client, **fields):
    return client.post("/v1/captions", files={"image": ("x.jpg", _jpeg(), "image/jpeg")},
                       data={k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()})


def test_api_cli_and_rest_refuse_too_many_captions_with_one_message(tiny_checkpoint, client, tmp_path, capsys):
    from captioner.api import Captioner
    from captioner.cli import main as cli

    with pytest.raises(GenerationConfigError) as e:
        Captioner.from_pretrained(tiny_checkpoint, "cpu").caption(Image.new("RGB", (40, 40)), beam_size=2,
                                                                  num_captions=3)
    message = str(e.value)
    assert message.startswith(RULE)

    (tmp_path / "photo.jpg").write_bytes(_jpeg())
    assert cli(["caption", str(tmp_path / "photo.jpg"), "--out", str(tmp_path / "o.jsonl"), "--checkpoint",
                str(tiny_checkpoint), "--beam-size", "2", "--num-captions", "3", "--no-progress"]) == 2
    assert f"captioner caption: error: {message}" in capsys.readouterr().err

    as_json = {"image": base64.b64encode(_jpeg()).decode(), "beam_size": 2, "num_captions": 3}
    for r in (client.post("/v1/captions", json=as_json), _post(client, beam_size=2, num_captions=3)):
        assert r.status_code == 422
        assert r.json()["detail"] == [{"loc": ["body", "num_captions"], "msg": message, "type": "value_error"}]


def test_rest_takes_every_option_and_answers_as_the_api(tiny_checkpoint, client):
    from captioner.api import Captioner

    cap = Captioner.from_pretrained(tiny_checkpoint, "cpu")
    image = Image.open(io.BytesIO(_jpeg()))
    plain = dict(beam_size=4, num_captions=4)
    for options in (plain, {**plain, "length_penalty": 1.0}, {**plain, "block_trigrams": True},
                    {**plain, "length_penalty": 0.5, "block_trigrams": True, "max_length": 5}):
        r = _post(client, **options)
        assert r.status_code == 200, r.text
        direct = [(c.text, round(c.log_prob, 4), round(c.score, 4)) for c in cap.caption(image, **options)]
        assert [(c["caption"], round(c["log_prob"], 4), round(c["score"], 4)) for c in r.json()["captions"]] == direct
    # the options reached the decoder: ranked by log_prob / length, and no trigram repeated
    scored = _post(client, **plain, length_penalty=1.0).json()["captions"]
    assert all(c["score"] == pytest.approx(c["log_prob"] / (len(c["caption"].split()) + 1), rel=1e-4)
               for c in scored)
    free = [c["caption"].split() for c in _post(client, **plain).json()["captions"]]
    blocked = [c["caption"].split() for c in _post(client, **plain, block_trigrams=True).json()["captions"]]

    def repeats(words: list[str]) -> bool:
        tri = list(zip(words, words[1:], words[2:]))
        return len(set(tri)) < len(tri)

    assert any(map(repeats, free)) and not any(map(repeats, blocked))


@pytest.mark.parametrize("fields, field", [
    ({"length_penalty": "inf"}, "length_penalty"),
    ({"length_penalty": "nan"}, "length_penalty"),
    ({"length_penalty": "much"}, "length_penalty"),
    ({"block_trigrams": "1"}, "block_trigrams"),
])
def test_rest_refuses_bad_new_options_with_422(client, fields, field):
    r = _post(client, **fields)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", field]
