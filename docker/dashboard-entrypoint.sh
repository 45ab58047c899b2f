#!/bin/sh
# optuna-dashboard on the study database $OPTUNA_STORAGE, listening on
# ${OPTUNA_DASHBOARD_HOST:-0.0.0.0} (every interface of the container) port
# ${OPTUNA_DASHBOARD_PORT:-8080}, with ttl-search's artifact store (trial checkpoints) at
# $OPTUNA_ARTIFACT_DIR. It serves with gunicorn where installed (the image has it), else
# wsgiref. Extra arguments go to optuna-dashboard.
set -eu
: "${OPTUNA_STORAGE:?set OPTUNA_STORAGE to the study database URL, e.g. postgresql+psycopg://ttl:PASSWORD@postgres:5432/ttl}"
if [ -n "${OPTUNA_ARTIFACT_DIR:-}" ]; then
  set -- --artifact-dir "$OPTUNA_ARTIFACT_DIR" "$@"
fi
exec optuna-dashboard --host "${OPTUNA_DASHBOARD_HOST:-0.0.0.0}" --port "${OPTUNA_DASHBOARD_PORT:-8080}" \
  --server auto "$@" "$OPTUNA_STORAGE"
