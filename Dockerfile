# The captioner REST service:
#   docker build -t captioner .
#   docker run -p 8000:8000 --stop-timeout 60 --read-only --tmpfs /tmp captioner
# (or `docker compose up`). Serves the model shipped in the package unless CAPTIONER_CHECKPOINT names another:
#   docker run ... -v "$PWD/models:/models:ro" -e CAPTIONER_CHECKPOINT=/models/mymodel captioner
# (an absolute host path: Docker CLIs before 23 refuse "./models"; the files must be readable by uid 10001).
# --stop-timeout 60: on `docker stop` the server answers every queued request before it exits (at most shutdown +
# request timeout, 20 + 30 s); Docker's default 10 s would kill it mid-drain, and a Dockerfile cannot set it.
# --read-only --tmpfs /tmp: uploads over 1 MiB are spooled to /tmp; without a writable /tmp the server says so at
# start and exits 2.
#
# PyPI's torch wheels carry CUDA (they also run on CPU). For a much smaller CPU-only image use PyTorch's CPU wheels:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t captioner:cpu .
#
# Two stages: the first builds a virtual environment, dependencies first (they change rarely: an edit of the code
# reuses that layer) and the application last; the second copies only the environment, so no source tree, build
# folder or pip cache ends up in the image.
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
ARG TORCH_INDEX_URL=""
RUN python -m venv /venv
ENV PATH=/venv/bin:$PATH

WORKDIR /src
# 1. dependencies only, from the project metadata (no code yet)
COPY pyproject.toml ./
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" "torch>=2.4,<2.15" "torchvision>=0.19,<0.30"; \
    fi \
 && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['serve']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
# 2. the application
COPY README.md ./
COPY captioner ./captioner
COPY training ./training
COPY service ./service
RUN pip install --no-deps . && rm -rf /src/build

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/venv/bin:$PATH
COPY --from=build /venv /venv
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app

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
