#!/usr/bin/env bash
# Set up this checkout: system packages (when run as root), then a virtual environment in .venv with the
# project and its loaders installed at the tested versions (constraints.txt).
# Usage: ./setup.sh [--dev]   (--dev adds the test tools)
set -euo pipefail
cd "$(dirname "$0")"

# Fashion-MNIST is the embedded default dataset; FFCV compiles against turbojpeg and OpenCV.
APT_PACKAGES=(dataset-fashion-mnist pkg-config libturbojpeg0-dev libopencv-dev)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  else
    echo "setup.sh: missing system packages; install them first with:" >&2
    echo "  sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

extras="dali,ffcv"
[ "${1:-}" = "--dev" ] && extras="$extras,dev"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]"
echo "setup.sh: ready (.venv with extras: $extras)"
