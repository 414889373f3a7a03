#!/usr/bin/env bash
# The README's bench charts from a fresh run on this machine's GPU: for each preset the core and the
# whole layer, forward and training step, with the torch.compile'd models. Writes each run's Markdown
# report and JSON and one chart per preset and direction (<preset>-bf16-forward.png,
# <preset>-bf16-forward-backward.png: the layer run drawn with the core run) into OUT_DIR.
#
#   bash scripts/bench_charts.sh OUT_DIR [PRESET ...]    (presets: repo-1.3b paper-1.3b unless given)
#
# PYTHON names the interpreter that has flashmhf with its [plot] extra (default python3).
set -euo pipefail
OUT=${1:?usage: bash scripts/bench_charts.sh OUT_DIR [PRESET ...]}
shift
if [ $# -gt 0 ]; then PRESETS=("$@"); else PRESETS=(repo-1.3b paper-1.3b); fi
FM=("${PYTHON:-python3}" -m flashmhf.cli)
mkdir -p "$OUT"
for preset in "${PRESETS[@]}"; do
  for direction in fwd bwd; do
    if [ "$direction" = fwd ]; then args=(--tokens 1,64,1024,4096,16384); else args=(--backward --tokens 1024,4096,16384); fi
    "${FM[@]}" bench --preset "$preset" "${args[@]}" --compile --out "$OUT/core-$direction-$preset.md"
    "${FM[@]}" bench --preset "$preset" "${args[@]}" --compile --layer --out "$OUT/layer-$direction-$preset.md" \
      --plot --plot-with "$OUT/core-$direction-$preset.json"
  done
done
