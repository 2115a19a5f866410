#!/bin/bash
# Build kube-apiserver, kube-controller-manager and kubectl v1.20.2 (and, with `--node`, kubelet,
# kube-scheduler, kube-proxy and a static pause binary) from Debian bookworm's `kubernetes`
# SOURCE package with Debian's Go (no GitHub, dl.k8s.io or Go proxy needed), once:
# the binaries are cached outside the repository, keyed by version, and reused by every run.
#
#   scripts/k8s-build.sh            # prints the directory of the binaries
#   scripts/k8s-build.sh --node     # also what a node needs (the e2e `local` driver)
#   WEFT_CACHE=/elsewhere scripts/k8s-build.sh
#
# About 7-8 minutes on 2 cores the first time (the node binaries about 2 more); a few
# milliseconds after that.
set -euo pipefail
VERSION=1.20.2
DEB_VERSION=1.20.5+really1.20.2
CACHE=${WEFT_CACHE:-$HOME/.cache/weft}/k8s/v$VERSION
BIN=$CACHE/bin
WANT="kube-apiserver kube-controller-manager kubectl"
if [ "${1:-}" = --node ]; then WANT="$WANT kubelet kube-scheduler kube-proxy pause"; fi

have_all() { for b in $WANT; do [ -x "$BIN/$b" ] || return 1; done; }
if have_all; then echo "$BIN"; exit 0; fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9                      # one build at a time (parallel test sessions, CI retries)
if have_all; then echo "$BIN"; exit 0; fi

W=$CACHE/work
SUDO=$( [ "$(id -u)" = 0 ] || echo sudo )
log() { echo "k8s-build: $*" >&2; }
mkdir -p "$W/apt/lists/partial" "$W/apt/cache/archives/partial" "$W/src" "$W/debs" "$BIN.tmp" "$W/gopath/src/k8s.io"

if ! command -v go >/dev/null || ! command -v openssl >/dev/null; then
  log "installing Debian's golang-go and openssl"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends golang-go openssl >/dev/null
fi

# deb-src lines mirroring the system's own Debian sources, in a private apt configuration
{
  for f in /etc/apt/sources.list.d/*.sources; do
    if [ -f "$f" ]; then
      awk '/^URIs:/{u=$2} /^Suites:/{for(i=2;i<=NF;i++) print "deb-src " u " " $i " main"}' "$f"
    fi
  done
  if [ -f /etc/apt/sources.list ]; then sed -n 's/^deb \(.*\)/deb-src \1/p' /etc/apt/sources.list; fi
} | sort -u > "$W/apt/sources.list"
APTOPT=(-o "Dir::Etc::SourceList=$W/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$W/apt/lists" -o "Dir::Cache=$W/apt/cache")
K=$W/src/kubernetes-$VERSION
if [ ! -d "$K" ]; then
  log "fetching the kubernetes source package ($DEB_VERSION)"
  apt-get "${APTOPT[@]}" update -qq
  (cd "$W/src" && apt-get "${APTOPT[@]}" source --download-only "kubernetes=${DEB_VERSION}-1.1+deb12u1" 2>/dev/null \
     || apt-get "${APTOPT[@]}" source --download-only kubernetes 2>/dev/null)
  (cd "$W/src" && tar xzf "kubernetes_${DEB_VERSION}.orig.tar.gz")
  # Go >= 1.18 needs reflect2 >= 1.0.2 (the tree vendors 1.0.1): Debian's 1.0.2 source
  (cd "$W/debs" && apt-get download golang-github-modern-go-reflect2-dev 2>/dev/null && dpkg-deb -x golang-github-modern-go-reflect2-dev_*.deb x)
  rm -rf "$K/vendor/github.com/modern-go/reflect2"
  cp -r "$W/debs/x/usr/share/gocode/src/github.com/modern-go/reflect2" "$K/vendor/github.com/modern-go/"
  rm -f "$K/vendor/github.com/modern-go/reflect2/go.mod"
fi
ln -sfn "$K" "$W/gopath/src/k8s.io/kubernetes"
export GO111MODULE=off CGO_ENABLED=0 GOPROXY=off GOPATH=$W/gopath GOCACHE=$W/gocache HOME=$W GOFLAGS=
cd "$W/gopath/src/k8s.io/kubernetes"
if [ ! -f pkg/generated/openapi/zz_generated.openapi.go ]; then
  # the one generated file the tarball lacks
  log "generating pkg/generated/openapi"
  go build -o _output/bin/openapi-gen ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
  DIRS=$(find -H . \( -not \( \( -path './_*' -o -path './.*' -o -path ./vendor \) -prune \) \) -type f -name '*.go' \
    | sed 's|^./staging/src|vendor|; s|^\./||' | xargs grep -l '^// *+k8s:openapi-gen=' \
    | grep -v -E '^vendor/k8s.io/(code-generator|sample-apiserver)/' | xargs -n1 dirname | LC_ALL=C sort -u)
  ./_output/bin/openapi-gen --logtostderr -i "$(echo "$DIRS" | sed 's|^|k8s.io/kubernetes/|' | paste -sd, -)" \
    -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
    -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r "$W/openapi-violations.report" --output-base "$W/gopath/src"
fi
LD="-s -w"
for P in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
  LD="$LD -X $P.gitVersion=v$VERSION -X $P.gitMajor=1 -X $P.gitMinor=20 -X $P.gitTreeState=clean"
  LD="$LD -X $P.gitCommit=faecb196815e248d3ecfb03c680a4507229c2a56 -X $P.buildDate=2021-01-13T00:00:00Z"
done
for b in $WANT; do
  if [ "$b" = pause ]; then
    if [ ! -x "$BIN/pause" ]; then
      # the pod sandbox's process: Kubernetes' own pause.c, static, so the image needs no libc
      log "building pause"
      command -v gcc >/dev/null || $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev >/dev/null
      gcc -Os -static -DVERSION=v3.2-weft -o "$BIN.tmp/pause" build/pause/linux/pause.c
      strip "$BIN.tmp/pause"
      mkdir -p "$BIN" && mv "$BIN.tmp/pause" "$BIN/pause"
    fi
  elif [ ! -x "$BIN/$b" ]; then
    log "building $b"
    go build -ldflags "$LD" -o "$BIN.tmp/$b" "./cmd/$b"
    mkdir -p "$BIN" && mv "$BIN.tmp/$b" "$BIN/$b"
  fi
done
"$BIN/kube-apiserver" --version >&2
echo "$BIN"
