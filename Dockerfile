# syntax=docker/dockerfile:1
# ABC Gateway image: hash-checked dependencies, non-root, no redis-server inside.
# Redis is external (ABC_REDIS_URL is required); see README "Deployment".

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_NO_INPUT=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when the lock changes.
COPY requirements.lock ./
RUN /opt/venv/bin/pip install --require-hashes --no-deps -r requirements.lock

COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY plugins ./plugins
# setuptools comes from the lock, so the build needs no network and no isolation.
# The lock also holds the dev extra: the test-only packages are removed again.
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation . \
 && /opt/venv/bin/pip uninstall -y \
        pytest pytest-aiohttp pytest-asyncio pytest-timeout hypothesis \
        iniconfig pluggy pygments sortedcontainers \
        mypy mypy-extensions ruff types-PyYAML pathspec librt ast-serialize \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib


FROM ${PYTHON_IMAGE}
# LITELLM_LOCAL_MODEL_COST_MAP: litellm would otherwise fetch its price map at import.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ABC_CONFIG=/app/config/gateway.yaml \
    LITELLM_LOCAL_MODEL_COST_MAP=True

RUN groupadd --system --gid 10001 abc \
 && useradd --system --uid 10001 --gid abc --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin abc
WORKDIR /app
COPY --from=builder /opt/venv /opt/venv
COPY --chown=root:root config/gateway.yaml /app/config/gateway.yaml

USER 10001:10001
EXPOSE 8080

# slim has no curl: ask Python. urlopen raises on any non-2xx, which fails the check.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]

ENTRYPOINT ["abc-gateway"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
