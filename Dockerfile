# afterwrite: one image for every process (migrate, worker, beat, flower, the example web app).
#   docker build -t afterwrite .
#   docker run --rm -e AFTERWRITE_DATABASE_URL=... -e AFTERWRITE_REDIS_URL=... afterwrite
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Only what the package and the examples need (not .venv, .git or local data directories).
COPY pyproject.toml README.md ./
COPY afterwrite ./afterwrite
COPY examples ./examples
# The `examples` extra brings the web app's server (fastapi, uvicorn, flask).
RUN pip install ".[examples]"

# Least privilege: the code belongs to root; every process runs as this unprivileged user.
RUN useradd --system --uid 10001 --user-group --no-create-home afterwrite \
    && mkdir -p /var/lib/afterwrite/indexes /var/lib/afterwrite/spill \
    && chown -R afterwrite:afterwrite /var/lib/afterwrite
# FAISS indexes: written by the worker, read by the web app (a volume shared by both in
# docker-compose); the web app's spill journal (<data dir>/spill, a volume of its own). A named
# volume takes its directory's owner on first use.
ENV AFTERWRITE_DATA_DIR=/var/lib/afterwrite \
    AFTERWRITE_INDEX_DIR=/var/lib/afterwrite/indexes
USER afterwrite

EXPOSE 8000 5555 9808
CMD ["afterwrite", "worker"]
