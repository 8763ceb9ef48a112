#!/usr/bin/env bash
# Install everything sci-node needs on a fresh Debian/Ubuntu machine, idempotently:
#   * Debian packages: orthanc orthanc-python orthanc-dicomweb dcmtk dicom3tools, chromium (viewer test),
#     gcc + libc6-dev (the stack compiles orthanc/bind_address.c, which keeps Orthanc's DICOM port on loopback)
#   * the Python venv at .venv/ with sci-node installed in editable mode (+ test extras)
#   * the pinned OHIF viewer (npm @ohif/app@3.13.2) under orthanc/ohif-dist/ (skipped with --no-ohif)
#   * with --scale-out only: Debian's redis-server and the scale-out extra (Celery 5 + redis-py) for
#     `sci-node serve --engine celery` / `sci-node worker` and their tests (docs/scale-out.md);
#     the embedded default needs neither, so the plain command installs neither
# Re-running it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WITH_OHIF=1
SCALE_OUT=0
for arg in "$@"; do
  case "$arg" in
    --no-ohif) WITH_OHIF=0 ;;
    --scale-out) SCALE_OUT=1 ;;
    *) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

need_apt=0
pkgs="orthanc orthanc-python orthanc-dicomweb dcmtk dicom3tools chromium gcc libc6-dev"
# npm only fetches the OHIF package; Debian's npm only when none is there (NodeSource ships its own)
if [ "$WITH_OHIF" = 1 ] && ! command -v npm >/dev/null 2>&1; then need_apt=1; pkgs="$pkgs npm"; fi
for cmd in Orthanc storescu storescp echoscu dciodvfy chromium cc; do
  command -v "$cmd" >/dev/null 2>&1 || need_apt=1
done
[ -e /usr/share/orthanc/plugins/libOrthancPython.so ] || [ -e /usr/share/orthanc/plugins-available/libOrthancPython.so ] || need_apt=1
if [ "$SCALE_OUT" = 1 ]; then
  pkgs="$pkgs redis-server"
  command -v redis-server >/dev/null 2>&1 || need_apt=1
fi
if [ "$need_apt" = 1 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "==> apt-get install $pkgs"
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $pkgs >/dev/null
  # The Debian package starts a system Orthanc on 4242/8042; sci-node runs its own.
  $SUDO systemctl disable --now orthanc >/dev/null 2>&1 || true
  # likewise Redis: the tests and docs/scale-out.md start their own on the port they choose
  [ "$SCALE_OUT" = 1 ] && { $SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true; }
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $PY"
  "$PY" -m venv .venv
fi
extras="test"
[ "$SCALE_OUT" = 1 ] && extras="test,scale-out"
stamp=.venv/.sci-node-installed-$extras
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
  echo "==> pip install -e .[$extras] (torch is large: first run takes minutes)"
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
  .venv/bin/python -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi

if [ "$WITH_OHIF" = 1 ] && [ -x scripts/install_ohif.sh ]; then
  scripts/install_ohif.sh
fi
echo "==> install complete ($ROOT)"
