#!/usr/bin/env bash
# Prints the Python interpreter `make` builds .venv from (override: `make PY=...`).
#
# Why not simply `python3`: on the machines this project is measured on, `python3` is
# a pyenv build (configured with --enable-shared and without --enable-optimizations:
# every call into the interpreter goes through libpython's PLT, no profile-guided
# layout), while the distribution's /usr/bin/python3 (Debian's: PGO + LTO, libpython
# linked in) ran the same worker with 15-28 % less CPU per event on the transform
# benchmark (docs/performance.md, "Session 8"). The first candidate that is CPython >= 3.11 and
# can really build a venv with pip wins; `python3` is the fallback.
set -u
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for candidate in /usr/bin/python3 python3; do
  command -v "$candidate" >/dev/null 2>&1 || continue
  "$candidate" -c 'import sys; sys.exit(not (sys.version_info >= (3, 11) and sys.implementation.name == "cpython"))' \
    >/dev/null 2>&1 || continue
  if "$candidate" -m venv "$tmp/venv" >/dev/null 2>&1 && "$tmp/venv/bin/python" -m pip --version >/dev/null 2>&1; then
    echo "$candidate"
    exit 0
  fi
  rm -rf "$tmp/venv"
done
echo python3
