# The captioner REST service: `docker build -t captioner .` then `docker run -p 8000:8000 captioner`
# (or `docker compose up`). Serves the model shipped in the package unless CAPTIONER_CHECKPOINT names another
# (mount it, e.g. -v ./models:/models:ro -e CAPTIONER_CHECKPOINT=/models/mymodel).
#
# PyPI's torch wheels carry CUDA (they also run on CPU). For a much smaller CPU-only image pass the PyTorch
# CPU wheel index: docker build --build-arg TORCH_INDEX_URL=<that index URL> -t captioner:cpu .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

ARG TORCH_INDEX_URL=""

WORKDIR /app
COPY pyproject.toml README.md ./
COPY captioner ./captioner
COPY training ./training
COPY service ./service
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" "torch>=2.4,<2.15" "torchvision>=0.19,<0.30"; \
    fi \
 && pip install ".[serve]" \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin app

USER app
WORKDIR /home/app
# every setting is a CAPTIONER_* variable (see service/settings.py); in a container, listen on all interfaces
ENV CAPTIONER_HOST=0.0.0.0 \
    CAPTIONER_PORT=8000
EXPOSE 8000

# ready = model loaded and warmed up; the start period covers loading on a slow CPU
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('CAPTIONER_PORT', '8000'), timeout=2)"

# SIGTERM (docker stop) drains: accepted requests are answered before the process exits
STOPSIGNAL SIGTERM
CMD ["captioner", "serve"]
