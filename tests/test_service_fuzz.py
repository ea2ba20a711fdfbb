"""Schemathesis against the running app (uvicorn on 127.0.0.1, a real tiny caption+VQA model): every operation of
the OpenAPI document, schema-valid and schema-invalid requests, every built-in check. Deterministic: a fixed seed
and a bounded number of examples per operation, so a failure reproduces."""
from __future__ import annotations

import time

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="test extra not installed (pip install -e '.[test]')")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn", reason="service extra not installed (pip install -e '.[serve]')")

from schemathesis.config import SchemathesisConfig  # noqa: E402
from schemathesis.generation.modes import GenerationMode  # noqa: E402

from _service_util import jpeg_bytes, serve_in_thread, tiny_vqa_checkpoint  # noqa: E402
from captioner.config import VQAConfig  # noqa: E402
from captioner.tokenizer import Vocabulary  # noqa: E402

import os
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 30))  # per operation and generation mode; ~10 s for the whole API
CONFIG = {
    "seed": 20261202,
    "generation": {"mode": "all", "max-examples": EXAMPLES, "deterministic": True},
}
PHOTO = jpeg_bytes(64, 48, seed=3)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from service.app import create_app
    from service.settings import Settings

    ckpt = tiny_vqa_checkpoint(tmp_path_factory.mktemp("fuzz") / "model")
    app = create_app(Settings(checkpoint=ckpt, device="cpu", max_delay_ms=0, request_timeout_s=10))
    with serve_in_thread(app) as url:
        t0 = time.monotonic()
        while httpx.get(f"{url}/readyz").status_code != 200:
            assert time.monotonic() - t0 < 60, "service not ready"
            time.sleep(0.05)
        yield url, Vocabulary.load(ckpt / "vocab.json")


def _openapi() -> dict:
    """The app's OpenAPI document: building the app loads no model (that happens when it starts)."""
    from service.app import create_app
    from service.settings import Settings

    return create_app(Settings(device="cpu")).openapi()


# loaded at collection from the document itself: schemathesis' lazy fixture loader does not run on pytest 9.2
schema = schemathesis.openapi.from_dict(_openapi(), config=SchemathesisConfig.from_dict(CONFIG))


@pytest.mark.slow
@schema.parametrize()
def test_api_conforms_to_its_openapi_and_never_answers_5xx(case, api):
    url, vocab = api
    # generated "binary" is random bytes, never an image: give schema-valid requests a real photo, so they
    # reach the model and the positive-data check sees what a client that follows the schema gets
    if case.meta.generation.mode == GenerationMode.POSITIVE and isinstance(case.body, dict) and "image" in case.body:
        case.body["image"] = PHOTO if case.media_type == "multipart/form-data" else _b64(PHOTO)
        _cross_field_rules(case.body, vocab)
    response = case.call_and_validate(base_url=url)  # every built-in check, not_a_server_error included
    assert response.status_code < 500, response.text


def _cross_field_rules(body: dict, vocab) -> None:
    """The rules JSON Schema cannot state, which the schema's descriptions do: n-best captions need a beam at least
    n wide unless sampling; a question and each choice hold a word, and choices differ after tokenization and to
    the model (its word ids, unknown words all being <unk>); attention
    maps only from an attention model (the served one is not: its 422 is tested in test_attention.py)."""
    if body.get("attention") in (True, "true"):
        body["attention"] = False
    if "num_captions" in body and not body.get("sample") in (True, "true"):
        body["num_captions"] = min(body["num_captions"], body.get("beam_size", 3))
    from captioner.tokenizer import tokenize

    if isinstance(body.get("question"), str) and not tokenize(body["question"]):
        body["question"] += " what"
    if isinstance(body.get("choices"), list):
        seen, kept = set(), []
        for c in body["choices"]:
            key = tuple(vocab.encode(c, VQAConfig().max_answer_words))
            if tokenize(c) and key not in seen:
                seen.add(key)
                kept.append(c)
        kept += [w for w in ("dog", "cat", "grass") if tuple(vocab.encode(w)) not in seen][:max(0, 2 - len(kept))]
        body["choices"] = kept


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()
