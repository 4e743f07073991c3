#!/usr/bin/env bash
# A short real-size run on a GPU: the Qwen2.5-VL-3B architecture (random init), bf16
# autocast, transformers' sdpa, 448x448 images; prints seconds per step and peak memory.
#   bash experiments/gpu_smoke.sh [extra Hydra overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
out=${OUT_DIR:-outputs/gpu_smoke}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
"$PY" -m src.train model=qwen2_5_vl_3b_arch precision=bf16 softmax=sdpa max_steps=${STEPS:-20} \
  lr=1e-5 batch_size=${BATCH:-4} data.min_pixels=200704 data.max_pixels=200704 data.image_size=448 \
  data.num_train=128 logger=csv trainer.progress=false monitor.every=5 hydra.run.dir="$out" "$@"
"$PY" - "$out/record.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"status={r['status']} steps={r['steps_done']} s/step={1 / max(r['steps_per_s'], 1e-9):.3f} "
      f"peak_memory_gb={r['peak_memory_gb']} device={r['device']} final_loss={r['final_loss']}")
PYEOF
