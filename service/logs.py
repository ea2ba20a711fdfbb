"""Logging set-up for `captioner serve`: plain text lines, or one JSON object per line for log shippers.

Access lines come from the ``service.access`` logger, one per request (MetricsMiddleware), with the request's
fields as ``extra`` so the JSON form carries them as keys:
    2026-12-02 14:31:07 INFO service.access: POST /v1/captions 200 41.3 ms batch=3 id=5f0c2a9e1b7d4c11
    {"time": "...", "level": "INFO", "logger": "service.access", "message": "POST /v1/captions 200 ...",
     "method": "POST", "path": "/v1/captions", "status": 200, "ms": 41.3, "batch_size": 3, "request_id": "..."}
"""
from __future__ import annotations

import json
import logging
import time

ACCESS_FIELDS = ("method", "path", "status", "ms", "batch_size", "request_id", "client")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                       + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        out.update({k: getattr(record, k) for k in ACCESS_FIELDS if hasattr(record, k)})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
