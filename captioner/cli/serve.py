"""``captioner serve``: the REST service (captions, multiple-choice VQA, web page) on one model, dynamically batched.

    captioner serve                                   # the model shipped in the package, on 127.0.0.1:8000
    captioner serve --checkpoint runs/x/best --host 0.0.0.0 --port 8080 --max-batch-size 64 --api-key "$KEY"

Every flag has a CAPTIONER_* environment variable (e.g. CAPTIONER_MAX_BATCH_SIZE=64); flags win.
SIGTERM / Ctrl-C: stop accepting, answer every queued request, cut uploads still arriving after --shutdown-timeout,
exit 0.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path




def _temp_dir_problem() -> str | None:
    """Multipart uploads over 1 MiB are spooled to a temporary file: on a read-only filesystem without a writable
    temp dir every such upload would fail. Said once at start-up instead."""
    import tempfile

    try:
        with tempfile.TemporaryFile():
            return None
    except OSError as e:
        return (f"no writable temporary directory ({e}): uploads over 1 MiB are spooled to one. Give it one: "
                "docker run --tmpfs /tmp (compose: tmpfs: [/tmp]), or TMPDIR=/a/writable/folder")


def main(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from captioner.api import default_checkpoint
    from captioner.checkpoint import CheckpointError, read_config

    try:
        import uvicorn  # noqa: F401

        from service.settings import Settings
    except ImportError as e:
        print(f"captioner serve: missing the service dependencies ({e.name}); install with: pip install 'captioner[serve]'",
              file=sys.stderr)
        return 2

    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        for err in e.errors():
            print(f"captioner serve: --{str(err['loc'][0]).replace('_', '-')}: {err['msg']}", file=sys.stderr)
        return 2

    # never serve random weights: without a real checkpoint there is nothing to serve
    ckpt = Path(settings.checkpoint) if settings.checkpoint else default_checkpoint()
    if not ckpt.is_dir():
        hint = ("no checkpoint given and the default model is not installed at " f"{ckpt}" if not settings.checkpoint
                else f"checkpoint {ckpt} does not exist")
        print(f"captioner serve: {hint}. Pass --checkpoint DIR (a directory with config.json, vocab.json and "
              "model.safetensors) or set CAPTIONER_CHECKPOINT.", file=sys.stderr)
        return 2
    try:
        read_config(ckpt)
    except CheckpointError as e:
        print(f"captioner serve: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a mounted checkpoint the container's user may not read
        print(f"captioner serve: cannot read the checkpoint {ckpt}: {e.strerror or e} ({e.filename or ckpt})",
              file=sys.stderr)
        return 2
    settings.checkpoint = ckpt
    if (problem := _temp_dir_problem()) is not None:
        print(f"captioner serve: {problem}", file=sys.stderr)
        return 2

    from service.app import create_app
    from service.logs import configure

    configure(settings.log_level, settings.log_format)

    from service.server import serve

    app = create_app(settings)
    svc = app.state.svc
    logging.getLogger("service").info("settings: %s", settings.public_dict())
    serve(app, settings)
    if svc.error:
        print(f"captioner serve: model failed to load: {svc.error}", file=sys.stderr)
        return 2 if svc.error_is_input else 1
    return 0
