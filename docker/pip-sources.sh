#!/bin/sh
# pip's source options for docker/Dockerfile's build stage, from its build arguments (set in the
# environment of RUN): PIP_INDEX (--index-url), PIP_EXTRA_INDEX and PIP_TRUSTED (space-separated),
# and, with the argument `torch`, TORCH_INDEX_URL and TORCH_FIND_LINKS. CA certificates in
# /tmp/build-certs/*.pem (docker/build-certs/) are added to the system's bundle for pip
# (--cert, and /etc/pip.conf of the build stage for pip's subprocesses).
set -eu
out=""
[ -n "${PIP_INDEX:-}" ] && out="$out --index-url $PIP_INDEX"
for url in ${PIP_EXTRA_INDEX:-}; do out="$out --extra-index-url $url"; done
for host in ${PIP_TRUSTED:-}; do out="$out --trusted-host $host"; done
if [ "${1:-}" = "torch" ]; then
  [ -n "${TORCH_INDEX_URL:-}" ] && out="$out --extra-index-url $TORCH_INDEX_URL"
  [ -n "${TORCH_FIND_LINKS:-}" ] && out="$out --find-links $TORCH_FIND_LINKS"
fi
if ls /tmp/build-certs/*.pem >/dev/null 2>&1; then
  bundle=/tmp/build-certs/bundle.crt
  [ -f "$bundle" ] || cat /etc/ssl/certs/ca-certificates.crt /tmp/build-certs/*.pem > "$bundle" 2>/dev/null \
    || cat /tmp/build-certs/*.pem > "$bundle"
  # In pip's global config too: pip's build-isolation subprocesses do not get --cert.
  printf '[global]\ncert = %s\n' "$bundle" > /etc/pip.conf
  out="$out --cert $bundle"
fi
echo "$out"
