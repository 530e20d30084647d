#!/usr/bin/env bash
# An offline base image for the Docker backend and compose on hosts that cannot reach a registry
# (no Docker Hub, no nvidia/cuda): a Debian root filesystem made with debootstrap from a Debian
# mirror (or a local mirror of one), imported into the engine with `docker import`, and tagged.
# It has no CUDA: the cells run on the CPU. Give it to the matrix as --docker-base <tag>, to compose
# as DYMU_DOCKER_BASE=<tag>, and to the real-engine tests (`nox -s docker_tests`, which calls this
# script when the tag is missing).
#
# Usage (root, or a user who may run debootstrap and talk to the engine):
#   bash docker/offline-base.sh [--tag dymu-base:bookworm] [--suite bookworm] [--mirror URL] [--force]
# Needs: debootstrap (apt-get install debootstrap) and a Docker engine; building a cell image from
# it then needs the same Debian mirror (its apt step installs the cell's python) and PyPI. Only the
# suite's own Pythons exist there (bookworm: 3.11; the 3.10 cells fail to install on it).
# Options, not DYMU_* variables: the matrix refuses DYMU_* names it does not read.
set -euo pipefail

tag=dymu-base:bookworm
suite=bookworm
mirror=http://deb.debian.org/debian
force=0
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag=$2; shift 2 ;;
    --suite) suite=$2; shift 2 ;;
    --mirror) mirror=$2; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "offline-base: error: $1: unknown option; use --tag, --suite, --mirror or --force" >&2; exit 2 ;;
  esac
done

command -v debootstrap > /dev/null || { echo "offline-base: error: debootstrap: not installed; apt-get install debootstrap" >&2; exit 2; }
command -v docker > /dev/null || { echo "offline-base: error: docker: no CLI on PATH; install the Docker CLI" >&2; exit 2; }
if [ "$force" = 0 ] && docker image inspect "$tag" > /dev/null 2>&1; then
  echo "offline-base: $tag exists (--force rebuilds it)"
  exit 0
fi

root=$(mktemp -d /tmp/dymu-rootfs-XXXXXX)
trap 'rm -rf "$root"' EXIT
start=$(date +%s)
# minbase: essential packages + apt (debootstrap's resolver is simple: python comes in the image build)
debootstrap --variant=minbase --include=ca-certificates \
  "$suite" "$root" "$mirror" > "$root.log" 2>&1 \
  || { cp "$root/debootstrap/debootstrap.log" "$root.log" 2> /dev/null; tail -20 "$root.log" >&2
       echo "offline-base: error: debootstrap $suite from $mirror failed; see $root.log" >&2; exit 1; }
rm -f "$root.log"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
# the engine's import takes a tar of the root filesystem; numeric owners keep root's files root's
tar --numeric-owner -C "$root" -c . \
  | docker import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$tag" > /dev/null
echo "offline-base: $tag from debian $suite ($mirror) in $(( $(date +%s) - start )) s"
