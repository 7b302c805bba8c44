# The usage meter: one image for every role (worker, node, query API, init), chosen by the
# `meter` subcommand:  docker run IMAGE worker | migrate | topics | node | serve-api | ...
# Settings come from METER_* environment variables (worker/settings.py); nothing secret is baked in.

# -- build: install the project and its dependencies into a venv ----------------------------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml ./
COPY schemas/ schemas/
COPY worker/ worker/
COPY node/ node/
COPY common/ common/
RUN pip install .

# -- runtime -------------------------------------------------------------------------------
FROM python:3.11-slim

RUN groupadd --system --gid 10001 meter \
    && useradd --system --uid 10001 --gid meter --home-dir /app --shell /usr/sbin/nologin meter \
    && mkdir -p /app /data \
    && chown meter:meter /data

# The package brings its SQL migrations and dashboard files (package data).
COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    METER_HTTP_HOST=0.0.0.0 \
    METER_LOG_JSON=true \
    METER_CLICKHOUSE_DSN=chdb:///data/clickhouse

WORKDIR /app
USER meter:meter

EXPOSE 8090
ENTRYPOINT ["meter"]
CMD ["worker"]
