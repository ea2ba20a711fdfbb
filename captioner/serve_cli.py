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


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("captioner serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--checkpoint", default=None, help="checkpoint directory (env CAPTIONER_CHECKPOINT; default: the shipped model)")
    a("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    a("--precision", choices=["fp32", "bf16", "fp16"], default=None, help="autocast precision (default fp32)")
    a("--host", default=None, help="address to bind (default 127.0.0.1; 0.0.0.0 in containers)")
    a("--port", type=int, default=None, help="port (default 8000; 0 = any free port)")
    a("--max-batch-size", type=int, default=None, help="most requests per model batch (default 32)")
    a("--max-delay-ms", type=float, default=None, help="wait at most this long after a batch's first request (default 5)")
    a("--max-queue", type=int, default=None, help="queued requests beyond this get 503 (default 256)")
    a("--request-timeout", dest="request_timeout_s", type=float, default=None,
      help="seconds before a request gets 504 and its work is dropped (default 30)")
    a("--max-upload-bytes", type=int, default=None, help="largest image upload (default 10 MiB)")
    a("--max-image-pixels", type=int, default=None, help="largest width x height (default 40,000,000)")
    a("--max-aspect-ratio", type=float, default=None,
      help="most elongated image, longer/shorter side (default 100): the resize would blow up thinner ones")
    a("--client-timeout", dest="client_timeout_s", type=float, default=None,
      help="seconds a client may take to send its request headers, or pause while sending a body (default 10)")
    a("--shutdown-timeout", dest="shutdown_timeout_s", type=float, default=None,
      help="after SIGTERM, cut uploads still arriving after this many seconds; queued requests are still "
           "answered (default 20)")
    a("--decode-workers", type=int, default=None, help="threads decoding uploaded images (default 4)")
    a("--api-key", dest="api_keys", action="append", default=None,
      help="require this key (Authorization: Bearer or X-API-Key); repeat for several (env: comma-separated)")
    a("--cors-origin", dest="cors_origins", action="append", default=None,
      help="allow browser calls from this origin; repeat for several; '*' for any")
    a("--log-level", choices=["critical", "error", "warning", "info", "debug"], default=None)
    a("--log-format", choices=["text", "json"], default=None,
      help="text lines (default) or one JSON object per line, for log shippers")
    a("--no-access-log", dest="access_log", action="store_false", default=None,
      help="no log line per request (by default: method, path, status, ms, batch size, request id)")
    a("--no-warmup", dest="warmup", action="store_false", default=None, help="skip the warm-up batches")
    a("--no-channels-last", dest="channels_last", action="store_false", default=None,
      help="keep NCHW convolutions (NHWC is the default: faster on CPU and GPU)")
    a("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    a("--encode-batch-size", type=int, default=None,
      help="images per encoder call within a batch (default: 4 on CPU, where small convolution batches stay in "
           "cache, the whole batch on GPU)")
    return p


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
    settings.checkpoint = ckpt

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
        return 1
    return 0
