#!/usr/bin/env bash
# Tune every kind the runtime runs for one preset on this machine's GPU, as the shipped cache holds
# them: the phases of flashmhf/tuner/phases.py (the forward family at every token bucket its kinds
# serve, the layer's one-kernel forward up to 1024 tokens, the backward families at training sizes).
# Prints the wall time of each phase and of the whole run.
#
#   bash scripts/tune_preset.sh PRESET CACHE_FILE [DTYPES] [BUDGET_S]
#
# DTYPES: comma list (default bf16); BUDGET_S: seconds per phase and dtype (default 75).
# PYTHON names the interpreter that has flashmhf with its [tune] extra (default python3).
set -euo pipefail
PRESET=${1:?usage: bash scripts/tune_preset.sh PRESET CACHE_FILE [DTYPES] [BUDGET_S]}
CACHE=${2:?usage: bash scripts/tune_preset.sh PRESET CACHE_FILE [DTYPES] [BUDGET_S]}
DTYPES=${3:-bf16}
BUDGET=${4:-75}
PY=${PYTHON:-python3}
PHASES=$("$PY" -m flashmhf.tuner.phases "$PRESET")
# One run tunes every dtype named, under one --time-budget: BUDGET_S for each of them.
N_DTYPES=$(echo "$DTYPES" | tr ',' '\n' | grep -c .)
PHASE_BUDGET=$((BUDGET * N_DTYPES))
start=$(date +%s)
summary=""
while read -r name kinds tokens trials; do
  t0=$(date +%s)
  "$PY" -m flashmhf.cli tune --preset "$PRESET" --dtype "$DTYPES" --kind "$kinds" --tokens "$tokens" \
    --trials "$trials" --time-budget "$PHASE_BUDGET" --cache "$CACHE" < /dev/null
  summary="$summary $name ($kinds) $(( $(date +%s) - t0 )) s,"
done <<< "$PHASES"
echo "$PRESET $DTYPES:$summary total $(( $(date +%s) - start )) s"
