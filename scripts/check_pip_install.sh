#!/usr/bin/env bash
# CI: the plain `pip install` path. Builds the wheel, installs it into a fresh venv (torch 2.13.0
# CPU first, as scripts/setup.sh does, so pip does not pull a CUDA build; then the wheel with its
# declared dependencies only, no extras), and checks that the package imports, that
# `flashmhf presets` and `flashmhf doctor` work without warnings (numpy present), and that a chart
# (the `plot` extra) stops with an error naming the extra.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; return "${PIPESTATUS[0]}"; }
PY=${PYTHON:-python3}

quiet "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$WORK/dist" .
WHEEL=$(ls "$WORK"/dist/flashmhf-*.whl)
"$PY" -m venv "$WORK/venv"
quiet "$WORK/venv/bin/pip" install -q --disable-pip-version-check torch==2.13.0
quiet "$WORK/venv/bin/pip" install -q --disable-pip-version-check "$WHEEL"

cd "$WORK"  # away from the source tree: only the installed package can be imported
export FLASHMHF_CACHE_DIR="$WORK/user-cache"
check() {  # check NAME COMMAND...: runs it, fails on a non-zero exit or a warning on stderr
  local name=$1; shift
  if ! "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"; then
    echo "plain pip install: '$*' failed:"; cat "$WORK/$name.out" "$WORK/$name.err"; exit 1
  fi
  if grep -Ei "warning|numpy" "$WORK/$name.err"; then
    echo "plain pip install: '$*' warned (above)"; exit 1
  fi
}
check import "$WORK/venv/bin/python" -c "import flashmhf_runtime as fm, flashmhf.cli; print(fm.PRESETS['repo-1.3b'])"
check presets "$WORK/venv/bin/flashmhf" presets
grep -q "repo-1.3b" "$WORK/presets.out"
check doctor "$WORK/venv/bin/flashmhf" doctor
grep -q "shipped" "$WORK/doctor.out" || { echo "plain pip install: doctor lists no shipped cache"; exit 1; }
grep -q "nvidia-h200.sqlite" "$WORK/doctor.out" || { echo "plain pip install: shipped cache missing"; cat "$WORK/doctor.out"; exit 1; }
echo '[{"tokens": 1, "flashmhf_ms": 1.0}]' >"$WORK/report.json"
if "$WORK/venv/bin/python" -m flashmhf.bench.plot "$WORK/report.json" >"$WORK/plot.out" 2>&1 \
    || ! grep -qF "pip install 'flashmhf[plot]'" "$WORK/plot.out"; then
  echo "plain pip install: a chart without matplotlib did not stop naming the plot extra:"; cat "$WORK/plot.out"; exit 1
fi
echo "plain pip install: wheel $(basename "$WHEEL") installs; import, presets and doctor work; charts ask for the plot extra"
