#!/usr/bin/env bash
# Tune every kind the runtime runs for one preset on this machine's GPU, as the shipped cache holds
# them: the forward family (fwd, fwd_ws and the layer's norm/router kind) at every token bucket, the
# layer's one-kernel forward (norm, router and core) up to 1024 tokens, the backward families (dq,
# dK/dU/dV and the norm/router backward) at training sizes. Prints the wall time of each phase and
# of the whole run.
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
# The kinds that take this preset's shape (e.g. the Gluon kinds take 16-bit inputs only), the layer's norm/router
# kinds with the head RMSNorm or without, as the preset has it.
kinds() {
  "$PY" - "$PRESET" "$@" <<'PYEOF'
import sys
from flashmhf.codegen import Spec, get_kind
from flashmhf_runtime import get_preset
p = get_preset(sys.argv[1])
layer = "norm_router" if p.head_norm else "router"
names = [k.replace("LAYER", layer) for k in sys.argv[2:]]
print(",".join(k for k in names if get_kind(k).shape_reason(
    Spec(k, p.n_heads, p.kv_heads, p.head_dim, p.n_experts, p.expert_dim, "bf16")) is None))
PYEOF
}
FORWARD=$(kinds fwd fwd_ws fwd_ws_split LAYER)
FUSED=$(kinds LAYER_core)
BACKWARD=$(kinds bwd_dq bwd_dq_ws bwd_dkuv bwd_dkuv_ws LAYER_bwd)
# One run tunes every dtype named, under one --time-budget: BUDGET_S for each of them.
N_DTYPES=$(echo "$DTYPES" | tr ',' '\n' | grep -c .)
PHASE_BUDGET=$((BUDGET * N_DTYPES))
start=$(date +%s)
"$PY" -m flashmhf.cli tune --preset "$PRESET" --dtype "$DTYPES" --kind "$FORWARD" \
  --tokens 1,16,64,256,1024,4096,16384 --trials 16 --time-budget "$PHASE_BUDGET" --cache "$CACHE"
fused=$(date +%s)
"$PY" -m flashmhf.cli tune --preset "$PRESET" --dtype "$DTYPES" --kind "$FUSED" \
  --tokens 1,16,64,256,1024 --trials 16 --time-budget "$PHASE_BUDGET" --cache "$CACHE"
mid=$(date +%s)
"$PY" -m flashmhf.cli tune --preset "$PRESET" --dtype "$DTYPES" \
  --kind "$BACKWARD" --tokens 1024,4096,16384 --trials 12 \
  --time-budget "$PHASE_BUDGET" --cache "$CACHE"
end=$(date +%s)
echo "$PRESET $DTYPES ($FORWARD; $FUSED; $BACKWARD): forward family $((fused - start)) s," \
  "one-kernel forward $((mid - fused)) s, backward families $((end - mid)) s, total $((end - start)) s"
