# Python 3.11 from Debian's packages: a local stand-in for python:3.11-slim-bookworm
# (docker/base-images.sh builds it). `python3 -m venv` works, as in the public image.
ARG DEBIAN_IMAGE=debian:bookworm-slim
FROM ${DEBIAN_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python-is-python3 ca-certificates passwd \
    && rm -rf /var/lib/apt/lists/*
CMD ["python3"]
