#!/bin/bash
# A Debian bookworm root filesystem for weft's images, made from Debian's packages alone
# (debootstrap, no registry): Python 3.11 with venv, etcd-server for the chart's optional etcd,
# CA certificates. Built once and cached outside the repository as a tarball, keyed by the
# suite and the package list; `docker import` turns it into the base image the Dockerfiles in
# agent/ and operator/ build FROM when no registry is at hand.
#
#   scripts/image-rootfs.sh      # prints the path of the tarball
#
# About a minute on 2 cores the first time.
set -euo pipefail
SUITE=bookworm
PACKAGES=python3,python3-venv,etcd-server,ca-certificates,procps,iproute2,tini
KEY=$(printf '%s %s v1' "$SUITE" "$PACKAGES" | sha256sum | cut -c1-12)
CACHE=${WEFT_CACHE:-$HOME/.cache/weft}/images
OUT=$CACHE/rootfs-$SUITE-$KEY.tar
if [ -s "$OUT" ]; then echo "$OUT"; exit 0; fi
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
if [ -s "$OUT" ]; then echo "$OUT"; exit 0; fi
SUDO=$( [ "$(id -u)" = 0 ] || echo sudo )
command -v debootstrap >/dev/null || {
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
}
# the mirror the system's own apt uses
MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[ -n "$MIRROR" ] || MIRROR=$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$MIRROR" ] || { echo "image-rootfs: no Debian mirror in the system's apt sources" >&2; exit 1; }
ROOT=$CACHE/rootfs-$SUITE-$KEY.tmp
$SUDO rm -rf "$ROOT"
echo "image-rootfs: debootstrap $SUITE ($PACKAGES)" >&2
$SUDO debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOT" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
  || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
# smaller and reproducible enough: no apt lists, caches, docs or man pages
$SUDO rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/* "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/*
$SUDO tar -C "$ROOT" --numeric-owner -cf "$OUT.tmp" .
$SUDO rm -rf "$ROOT"
mv "$OUT.tmp" "$OUT"
echo "$OUT"
