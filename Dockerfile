# The mirrorflow command in an image: `mirrorflow webhook`, `mirrorflow worker`
# and the operator commands (subscribers, replay). docker-compose.temporal.yml
# builds it for the webhook and worker services.

# Builder: install the project and its dependencies into a virtual environment
# that the runtime stage copies whole, so no build tooling ships.
FROM python:3.11-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/mirrorflow

WORKDIR /src
# .dockerignore keeps the context to what `pip install .` reads.
COPY . .
RUN /opt/mirrorflow/bin/pip install .


FROM python:3.11-slim-bookworm

ENV PATH=/opt/mirrorflow/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# A system user without a login shell; /var/lib/mirrorflow is where the
# subscribers database and file:// attachments live (a volume in compose).
RUN groupadd --system --gid 10001 mirrorflow \
    && useradd --system --uid 10001 --gid mirrorflow \
        --home-dir /var/lib/mirrorflow --shell /usr/sbin/nologin mirrorflow \
    && install --directory --owner=mirrorflow --group=mirrorflow --mode=0750 \
        /var/lib/mirrorflow

COPY --from=build /opt/mirrorflow /opt/mirrorflow

USER mirrorflow
WORKDIR /var/lib/mirrorflow

# The webhook's port, and the worker's Prometheus metrics when
# MIRRORFLOW_WORKER_METRICS_PORT is set to it.
EXPOSE 8080 9464

ENTRYPOINT ["mirrorflow"]
CMD ["--help"]
