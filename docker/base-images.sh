#!/usr/bin/env bash
# Local base images made from Debian's packages, for a builder that reaches no container registry
# (air-gapped, or behind a proxy that lets only package indexes through). Online builders do not
# need this script: the images default to today's public bases (python:3.11-slim-bookworm,
# postgres:17-alpine) and pull them.
#
#   bash docker/base-images.sh            # makes the three images below (skips those that exist)
#   bash docker/base-images.sh --force    # remakes them
#
# It makes, with `debootstrap --variant=minbase bookworm` (about 1 min) and `docker import`:
#   ttl-search-base/debian:bookworm      Debian 12, minbase: the root of the two others
#   ttl-search-base/python:3.11-bookworm Debian's python3 (3.11) with venv and ca-certificates:
#                                        PYTHON_IMAGE for docker/Dockerfile and dashboard.Dockerfile
#   ttl-search-base/postgres:15-bookworm Debian's postgresql-15 with an entrypoint that honours the
#                                        POSTGRES_USER/PASSWORD/DB variables (docker/base/postgres-entrypoint.sh):
#                                        POSTGRES_IMAGE for docker-compose.yml
# and prints the lines to put in .env. The Debian mirror is the one apt is configured with on this
# machine, or $DEBIAN_MIRROR. Needs root, debootstrap and a Docker engine.
set -euo pipefail
cd "$(dirname "$0")/.."

force=0
[ "${1:-}" = "--force" ] && force=1
suite=${DEBIAN_SUITE:-bookworm}
debian_image=${DEBIAN_BASE_IMAGE:-ttl-search-base/debian:bookworm}
python_image=${PYTHON_BASE_IMAGE:-ttl-search-base/python:3.11-bookworm}
postgres_image=${POSTGRES_BASE_IMAGE:-ttl-search-base/postgres:15-bookworm}
export DOCKER_BUILDKIT=0   # the classic builder: BuildKit would pull its frontend from a registry

have() { docker image inspect "$1" >/dev/null 2>&1; }

mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  # The first Debian main archive apt uses here (deb822 .sources or one-line sources.list).
  mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {print $2}' | grep -v -- '-security' | head -n1 || true)
  [ -n "$mirror" ] || mirror=$(grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)
fi
[ -n "$mirror" ] || { echo "base-images.sh: no Debian mirror found; set DEBIAN_MIRROR" >&2; exit 1; }

if [ "$force" = 1 ] || ! have "$debian_image"; then
  command -v debootstrap >/dev/null || { echo "base-images.sh: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
  root=$(mktemp -d /var/tmp/ttl-search-rootfs.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  echo "base-images.sh: debootstrap $suite from $mirror"
  t0=$(date +%s)
  debootstrap --variant=minbase "$suite" "$root" "$mirror" >/dev/null
  # apt lists and caches out; the image keeps its sources so that builds can apt-get install.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/var/log/* "$root"/tmp/*
  echo "base-images.sh: debootstrap took $(( $(date +%s) - t0 )) s"
  tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["bash"]' - "$debian_image" >/dev/null
  rm -rf "$root"
  trap - EXIT
fi

if [ "$force" = 1 ] || ! have "$python_image"; then
  docker build -q --network host -f docker/base/python.Dockerfile \
    --build-arg DEBIAN_IMAGE="$debian_image" -t "$python_image" docker/base >/dev/null
fi
if [ "$force" = 1 ] || ! have "$postgres_image"; then
  docker build -q --network host -f docker/base/postgres.Dockerfile \
    --build-arg DEBIAN_IMAGE="$debian_image" -t "$postgres_image" docker/base >/dev/null
fi

docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep '^ttl-search-base/' | sort
echo "# for .env:"
echo "PYTHON_IMAGE=$python_image"
echo "POSTGRES_IMAGE=$postgres_image"
