# The fallback Python base, for machines that cannot pull python:3.11-slim-bookworm (no registry).
# `make base-image` (deploy/images/build.py base) first makes a Debian bookworm root filesystem with
# `debootstrap --variant=minbase` and imports it as ROOTFS_IMAGE, then builds this on top of it with
# `--network host` (apt-get reaches the Debian mirror; nothing else is needed). The result is the same
# shape as the official image for our purposes: Debian bookworm, CPython 3.11 as `python`/`python3`
# with venv, CA certificates, a UTF-8 locale. Debian's python3.11 lives in /usr/bin, not /usr/local.

ARG ROOTFS_IMAGE=stratus-base-rootfs:bookworm
FROM ${ROOTFS_IMAGE}
ENV LANG=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive
# The root filesystem's sources name bookworm, bookworm-updates and bookworm-security: this takes the
# security fixes published since the debootstrap snapshot, then drops apt's caches and the docs.
RUN apt-get update \
    && apt-get -y upgrade \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python-is-python3 ca-certificates \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/share/doc/* /usr/share/man/* /usr/share/info/* \
    && python --version && python -m venv --help >/dev/null
CMD ["python3"]
