# syntax=docker/dockerfile:1.7
#
# optuna-dashboard for ttl-search studies in PostgreSQL. The upstream image
# (ghcr.io/optuna/optuna-dashboard) ships psycopg2 and its own Optuna release; this one pins the
# Optuna that ttl-search writes the database with and psycopg 3 (`postgresql+psycopg://` URLs),
# without torch or Ray. Build from the repository root:
#
#   docker build -f docker/dashboard.Dockerfile -t ttl-search-dashboard:0.1.0 .
#
# Run: docker run -e OPTUNA_STORAGE=postgresql+psycopg://USER:PASSWORD@HOST:5432/DB -p 8080:8080 ...
# The storage URL comes from the environment at run time; nothing secret is baked in.

ARG PYTHON_VERSION=3.11

# --- build: a virtual environment with the dashboard and its database driver ------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG OPTUNA_VERSION=5.0.0
ARG OPTUNA_DASHBOARD_VERSION=0.21.0
ARG PSYCOPG_VERSION=3.3.9
ARG GUNICORN_VERSION=27.0.1
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/dashboard \
    && /opt/dashboard/bin/pip install --no-cache-dir \
        "optuna==${OPTUNA_VERSION}" "optuna-dashboard==${OPTUNA_DASHBOARD_VERSION}" \
        "psycopg[binary]==${PSYCOPG_VERSION}" "gunicorn==${GUNICORN_VERSION}"

# --- runtime: the virtual environment only -----------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="ttl-search-dashboard" \
      org.opencontainers.image.description="optuna-dashboard for ttl-search studies (PostgreSQL, psycopg 3)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/dashboard/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OPTUNA_ARTIFACT_DIR=/data/artifacts/store
COPY --from=build /opt/dashboard /opt/dashboard
COPY --chmod=0755 docker/dashboard-entrypoint.sh /usr/local/bin/dashboard-entrypoint
RUN useradd --create-home --uid 1000 --user-group --shell /usr/sbin/nologin dashboard
USER 1000:1000
WORKDIR /home/dashboard
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/api/studies', timeout=4)"]
ENTRYPOINT ["dashboard-entrypoint"]
