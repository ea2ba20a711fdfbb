"""Deployment files and settings: docker-compose.yml parses and names real things, the Dockerfile is sane, settings
come from the environment and flags, `captioner serve` refuses to start without a model. (No Docker engine here.)"""
from __future__ import annotations

import re
import shlex

import pytest

from _service_util import ROOT

yaml = pytest.importorskip("yaml", reason="pyyaml is in the test extra (pip install -e '.[test]')")
pytest.importorskip("pydantic_settings", reason="service extra not installed (pip install -e '.[serve]')")

from captioner.cli import parsers  # noqa: E402
from captioner.cli import serve as serve_cli  # noqa: E402
from service.settings import Settings  # noqa: E402


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_are_complete_and_point_at_real_things():
    doc = compose()
    api = doc["services"]["api"]
    assert (ROOT / api["build"]).is_dir() and (ROOT / api["build"] / "Dockerfile").is_file()
    cmd = api["command"]
    assert cmd[:2] == ["captioner", "serve"]
    args = parsers.serve().parse_args(cmd[2:])  # every flag it passes exists
    assert args.host == "0.0.0.0" and args.port == 8000
    # the port the container listens on is the one published and probed
    assert any(str(p).endswith(":8000") for p in api["ports"])
    assert "/readyz" in " ".join(api["healthcheck"]["test"]) and "8000" in " ".join(api["healthcheck"]["test"])
    assert "replicas" in api["deploy"]
    for vol in api["volumes"]:
        host = vol.split(":")[0]
        assert (ROOT / host).is_dir(), f"compose mounts {host}, which is not in the repository"
    # every environment variable it sets is a real setting
    fields = set(Settings.model_fields)
    for name in api["environment"]:
        assert name.startswith("CAPTIONER_") and name[len("CAPTIONER_"):].lower() in fields, name
    gpu = doc["services"]["api-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["command"] == cmd
    dev = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]


def test_compose_defaults_are_valid_settings(monkeypatch):
    env = compose()["services"]["api"]["environment"]
    for name, value in env.items():
        m = re.fullmatch(r"\$\{\w+:-(.*)\}", str(value))  # ${VAR:-default} -> default
        monkeypatch.setenv(name, m.group(1) if m else str(value))
    s = Settings()
    assert s.checkpoint is None and s.device is None and s.api_keys == [] and s.cors_origins == []
    assert s.max_batch_size == 32 and s.max_delay_ms == 5 and s.request_timeout_s == 30
    # after SIGTERM the server is gone by shutdown + request timeout: inside docker's grace, so no SIGKILL
    # drops an accepted request
    grace = int(re.fullmatch(r"(\d+)s", compose()["x-api"]["stop_grace_period"]).group(1))
    assert s.shutdown_timeout_s + s.request_timeout_s + 5 < grace


def test_dockerfile_is_slim_non_root_and_probes_readiness():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim", text, re.M)
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _dest = shlex.split(line)
        for src in sources:
            if src.startswith("--from="):
                break  # a copy from the build stage, not from the context
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*", text, re.M) and "/readyz" in text
    assert 'CMD ["captioner", "serve"]' in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and "service" not in ignored and "captioner" not in ignored


def test_settings_from_environment_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPTIONER_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("CAPTIONER_API_KEYS", "key-aaaaaaaa, key-bbbbbbbb")
    monkeypatch.setenv("CAPTIONER_CORS_ORIGINS", "https://a.example,https://b.example")
    monkeypatch.setenv("CAPTIONER_PRECISION", "bf16")
    s = Settings()
    assert s.max_batch_size == 7 and s.precision == "bf16"
    assert s.api_keys == ["key-aaaaaaaa", "key-bbbbbbbb"] and s.cors_origins == ["https://a.example", "https://b.example"]
    assert "key-aaaaaaaa" not in str(s.public_dict())
    # flags win over the environment
    args = parsers.serve().parse_args(["--max-batch-size", "3", "--api-key", "key-cccccccc",
                                                   "--request-timeout", "2.5", "--no-warmup"])
    s = Settings(**{k: v for k, v in vars(args).items() if v is not None})
    assert s.max_batch_size == 3 and s.api_keys == ["key-cccccccc"] and s.request_timeout_s == 2.5 and not s.warmup
    with pytest.raises(ValueError, match="precision"):
        Settings(precision="fp8")
    with pytest.raises(ValueError, match="8 characters"):
        Settings(api_keys=["short"])


def test_serve_refuses_to_start_without_a_model(tmp_path, monkeypatch, capsys):
    parser = parsers.serve()
    monkeypatch.delenv("CAPTIONER_CHECKPOINT", raising=False)
    # no --checkpoint and no shipped default model: a clear message and a non-zero status
    monkeypatch.setattr("captioner.api.default_checkpoint", lambda: tmp_path / "not-installed")
    assert serve_cli.main(parser.parse_args([])) == 2
    err = capsys.readouterr().err
    assert "default model is not installed" in err and "--checkpoint" in err
    assert serve_cli.main(parser.parse_args(["--checkpoint", str(tmp_path / "missing")])) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert serve_cli.main(parser.parse_args(["--checkpoint", str(tmp_path / "empty")])) == 2
    assert "missing config.json" in capsys.readouterr().err
    assert serve_cli.main(parser.parse_args(["--max-batch-size", "0"])) == 2
    assert "--max-batch-size" in capsys.readouterr().err


def test_serve_is_a_captioner_command():
    from captioner.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0


def test_serve_exits_non_zero_when_the_model_fails_to_load(tiny_checkpoint, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors at all")
    args = parsers.serve().parse_args(["--checkpoint", str(broken), "--device", "cpu", "--port", "0",
                                                   "--log-level", "warning"])
    assert serve_cli.main(args) == 2  # the server started, the background load failed, the server stopped: the
    # checkpoint's files are the operator's to fix, like a bad flag
    assert "model failed to load" in capsys.readouterr().err


def test_readyz_reports_a_failed_load(tiny_checkpoint, tmp_path):
    import shutil
    import time

    from fastapi.testclient import TestClient

    from service.app import create_app

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    with TestClient(create_app(Settings(checkpoint=broken, device="cpu"))) as c:
        for _ in range(200):
            r = c.get("/readyz")
            if r.json()["status"] == "error":
                break
            time.sleep(0.02)
        assert r.status_code == 503 and r.json()["status"] == "error" and "error" in r.json()
        assert c.get("/healthz").status_code == 200
        r = c.post("/v1/captions", files={"image": ("x.jpg", b"x")})
        assert r.status_code == 503 and "failed to load" in r.json()["detail"]
