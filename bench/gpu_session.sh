#!/usr/bin/env bash
# The GPU measurements of issue 7, one stage per call, in the order a short lent-GPU session should take
# them (each stage fits one 10-minute command; the whole list takes more than a session's 30 minutes of device time).
#
#   bash bench/gpu_session.sh STAGE[,STAGE...] [OUT_DIR]
#
# Several stages, comma-separated, run one after another within one command's limit: each gets at most 540 s
# and at most what is left of BUDGET_S seconds (default 570) counted from the start, less 15 s; a stage with
# under 60 s left is not started (its name goes to OUT_DIR/skipped.txt). STAGE:SECONDS caps one stage lower
# (check:200,gemm-ws). A lent machine is given back after 30 idle seconds, so one call that takes several
# stages saves restarting it.
#
# STAGE, in priority order (2026-11-25: a session of 30 device minutes took check, gemm-ws, e2e-small, attention,
# e2e-medium, and attention again; results/triton_gpu*.json):
#   check        bench/triton_gpu_check.py: every launch of a `small` triton artifact against its torch kernel
#                (~100 s)
#   attention    sparse decode attention, the default config beside configs.ATTENTION_CHUNKED (scores over
#                128-channel chunks, value parts: fewer registers, never timed), 32-key tiles with 8 warps (the
#                fastest at batch 1-2 on 2026-11-25), and the default without its split, in-kernel encode or
#                in-kernel merge (what each costs at small batch, 27 us at batch 1 for 4 key tiles a program);
#                ATTENTION_CONFIGS (a JSON list) replaces the extra ones
#   e2e-small    e2e decode of `small`: v4c eager, v4c with CUDA graphs, transformers eager bf16 (~90 s)
#   gemm         FP8 GEMM against cuBLAS (the heuristic config plus four more: two of them 2 CTAs per SM at
#                prefill, whose wgmma can run while the other CTA applies its block scales; bench/README.md)
#   e2e-medium   e2e decode of `medium`
#   gemm-ws      FP8 GEMM against cuBLAS, the heuristic config beside the warp-specialized K loop's eight at
#                prefill (configs.CANDIDATES_WS; on 2026-11-25 under Triton 3.6 the 128-row ones gave wrong results
#                and the 64-row ones were slower); each config's result is checked before it is timed
#   siblings     bench/triton_siblings.py: sibling projections, separate launches vs the lowering's joined one
# OUT_DIR defaults to $OUT (the device tool's output folder), else bench/results/gpu.
#
# Nothing is downloaded: `bash bench/gpu_wheels.sh` first fills .whl/ here with the wheels the GPU image lacks
# (v4c's dependencies and transformers, for its Python); carry that folder (carry=[".whl"]). They and v4c are
# installed into /tmp/site (--no-deps, so the image's torch and triton stay). Each stage runs under `timeout` so a stuck compile cannot eat the
# session; a stage that times out leaves what it printed in OUT_DIR/STAGE.log.
set -euo pipefail
stages="${1:?usage: bash bench/gpu_session.sh STAGE[,STAGE...] [OUT_DIR] (STAGE: check attention e2e-small gemm e2e-medium gemm-ws siblings)}"
IFS=, read -r -a stage_list <<<"$stages"
for item in "${stage_list[@]}"; do
    case "${item%%:*}" in
        check | gemm-ws | e2e-small | attention | gemm | e2e-medium | siblings) ;;
        *) echo "unknown stage '$item'; expected one of: check attention e2e-small gemm e2e-medium gemm-ws siblings" >&2; exit 2 ;;
    esac
    if [[ "$item" == *:* && ! "${item#*:}" =~ ^[0-9]+$ ]]; then
        echo "stage '$item': expected STAGE:SECONDS with whole seconds after the colon" >&2
        exit 2
    fi
done
start_s=$SECONDS
budget_s="${BUDGET_S:-570}"
out="${2:-${OUT:-bench/results/gpu}}"
mkdir -p "$out"
site=/tmp/site
if [ ! -f "$site/.v4c-installed" ]; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    fi
    python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target "$site" .
    touch "$site/.v4c-installed"
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1  # each stage's log as it goes
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
run() {  # run LIMIT_S CMD...: the command under a time limit (and the budget's rest), its output in OUT_DIR/STAGE.log
    local limit=$1 left=$((budget_s - (SECONDS - start_s) - 15))
    shift
    [ "$left" -lt "$limit" ] && limit=$left
    [ -n "$cap" ] && [ "$cap" -lt "$limit" ] && limit=$cap
    echo "== $stage: limit ${limit}s" | tee "$out/$stage.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/$stage.log" || echo "== $stage: exit ${PIPESTATUS[0]}" | tee -a "$out/$stage.log"
}
for item in "${stage_list[@]}"; do
stage="${item%%:*}" cap=""
[ "$item" != "$stage" ] && cap="${item#*:}"
if [ $((budget_s - (SECONDS - start_s) - 15)) -lt 60 ]; then
    echo "$stage" >>"$out/skipped.txt"
    echo "== $stage: skipped, under 60 s of the budget left"
    continue
fi
case "$stage" in
    check) run 540 python3 bench/triton_gpu_check.py --config small --prompt 32 --new 2 --out "$out/check.json" \
        --dump "$out/over_tol" ;;
    e2e-small) run 540 python3 bench/triton_gpu.py --sections e2e --e2e-configs small --heuristic-only --repeats 5 \
        --out "$out/e2e_small.json" ;;
    attention) configs="${ATTENTION_CONFIGS:-}"
        [ -n "$configs" ] || configs="$(python3 -P -c 'import json; from v4c.targets.triton.configs import \
ATTENTION_CHUNKED as c; print(json.dumps(c + [{"BLOCK_N": 32, "num_warps": 8}, {"SPLIT_KV": 1}, \
{"ENCODE_IN_KERNEL": False}, {"SUM_IN_KERNEL": False}]))')"
        run 540 python3 bench/triton_gpu.py --sections attention --heuristic-only --repeats 7 \
        --attention-configs "$configs" --out "$out/attention.json" ;;
    gemm) run 540 python3 bench/triton_gpu.py --sections gemm --heuristic-only --repeats 7 --gemm-configs \
        '[{"BLOCK_M":16,"BLOCK_N":32,"BLOCK_K":128,"num_warps":4,"num_stages":4},{"BLOCK_M":128,"BLOCK_N":128,"BLOCK_K":128,"num_warps":8,"num_stages":3},{"BLOCK_M":64,"BLOCK_N":128,"BLOCK_K":128,"num_warps":4,"num_stages":3},{"BLOCK_M":128,"BLOCK_N":64,"BLOCK_K":128,"num_warps":4,"num_stages":3}]' \
        --out "$out/gemm.json" ;;
    gemm-ws) run 540 python3 bench/triton_gpu.py --sections gemm --heuristic-only --repeats 7 --gemm-configs \
        "$(python3 -P -c 'import json; from v4c.targets.triton.configs import CANDIDATES_WS as c; print(json.dumps(c))')" \
        --out "$out/gemm_ws.json" ;;
    e2e-medium) run 540 python3 bench/triton_gpu.py --sections e2e --e2e-configs medium --heuristic-only --repeats 5 \
        --out "$out/e2e_medium.json" ;;
    siblings) run 540 python3 bench/triton_siblings.py --repeats 7 --out "$out/siblings.json" ;;
esac
done
