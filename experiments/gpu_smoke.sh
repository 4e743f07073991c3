#!/usr/bin/env bash
# A short real-size run on a GPU: the Qwen2.5-VL-3B architecture (random init), bf16
# autocast, transformers' sdpa, 448x448 images; prints seconds per step and peak memory.
# Then the masked_rows and fp16_overflow baselines (conf/stress/*.yaml) at that size, each
# with its predicted fix, so the same mechanisms are checked on the 3B architecture; and the
# monitor's host-sync cost (`make bench`'s GPU part).
#   bash experiments/gpu_smoke.sh [extra Hydra overrides]     # SKIP_MECHANISMS=1: timing only
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
out=${OUT_DIR:-outputs/gpu_smoke}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
BIG=(model=qwen2_5_vl_3b_arch batch_size=${BATCH:-4} data.min_pixels=200704 data.max_pixels=200704
     data.image_size=448 data.num_train=128 logger=csv trainer.progress=false monitor.every=5)
show() {
  "$PY" - "$1/record.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[1]}: status={r['status']} cause={r['cause']} first_bad_step={r['first_bad_step']} "
      f"module={r['module']} steps={r['steps_done']} s/step={1 / max(r['steps_per_s'], 1e-9):.3f} "
      f"peak_memory_gb={r['peak_memory_gb']} device={r['device']} final_loss={r['final_loss']}")
PYEOF
}
"$PY" -m src.train "${BIG[@]}" precision=bf16 softmax=sdpa max_steps=${STEPS:-20} lr=1e-5 \
  hydra.run.dir="$out/timing" "$@"
show "$out/timing"
# the monitor's host-sync cost on this GPU: sync_every=1 against auto (deferred checks)
"$PY" -m experiments.bench --part sync
[ -n "${SKIP_MECHANISMS:-}" ] && exit 0
# masked_rows: summed-plane masks with left padding; predicted fix: sdpa (safe softmax)
# fp16_overflow: a massive activation in the first decoder MLP; predicted fix: bf16
for cell in \
    "masked_rows:stress=masked_rows precision=bf16 softmax=eager data.padding_side=left" \
    "masked_rows_fixed:stress=masked_rows precision=bf16 softmax=sdpa data.padding_side=left" \
    "fp16_overflow:stress=fp16_overflow precision=fp16 softmax=sdpa" \
    "fp16_overflow_fixed:stress=fp16_overflow precision=bf16 softmax=sdpa"; do
  name=${cell%%:*}; read -r -a args <<< "${cell#*:}"
  "$PY" -m src.train "${BIG[@]}" "${args[@]}" lr_x=1 max_steps=${MECH_STEPS:-5} \
    hydra.run.dir="$out/$name" "$@"
  show "$out/$name"
done
