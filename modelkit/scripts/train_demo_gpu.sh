#!/usr/bin/env bash
# Train the demo VLM on a CUDA machine from fresh synthetic scenes: three configurations side by
# side (the tiny model leaves a GPU mostly idle, so parallel runs cost little), weights-only saves
# (<OUT>/<run>/training_state.pt, ~15 MB each) that `train-vlm --resume` turns into checkpoints.
# Run from the repository root; carried wheels in .whl/ (transformers pinned as here) are used first.
# INIT_PACK=models/shapes (default; empty: from scratch) starts every run from the committed pack's
# weights (train-vlm --init-pack; a run that has saved a state resumes from it instead).
# RENDER=device (default) rasterises the scenes on the GPU (synth_torch.py), RENDER=workers with PIL in
# the data workers; RENDER_AB=1 first runs r1's configuration for 90 s with each and prints s/step.
set -u
OUT=${OUT:-out/gpu}
MINUTES=${MINUTES:-7.5}
DEVICE=${DEVICE:-cuda}
RENDER=${RENDER:-device}
INIT_PACK=${INIT_PACK-models/shapes}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/modelkit PYTHONUNBUFFERED=1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
nvidia-smi -L 2>/dev/null

train() {
  python3 -m modelkit train-vlm --device "$DEVICE" --light --save-every 60 --workers 4 --coord-step 10 \
    --text-layers 6 ${INIT_PACK:+--init-pack "$INIT_PACK"} "$@"
}
run() {
  local name=$1
  shift
  train --out "$OUT/$name" --minutes "$MINUTES" --render "$RENDER" "$@" >"$OUT/$name.log" 2>&1 &
}
if [ "${RENDER_AB:-0}" = 1 ]; then
  for r in workers device; do
    train --out "$OUT/ab-$r" --minutes 1.5 --render "$r" --seed 1 --stream-seed 501 --batch 128 --lr 2e-3 \
      >"$OUT/ab-$r.log" 2>&1
    echo "== render $r: $(grep '^step' "$OUT/ab-$r.log" | tail -n 1)"
  done
fi
# New stream seeds (101-103 and 201 trained the committed pack; 301 its CPU fine-tuning).
run r1 --seed 1 --stream-seed 501 --batch 128 --lr 2e-3
run r2 --seed 2 --stream-seed 502 --batch 256 --lr 2e-3
run r3 --seed 3 --stream-seed 503 --batch 128 --lr 1e-3 --warmup 300
(sleep 150 && nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv) &
wait
for f in "$OUT"/*.log; do echo "== $f"; grep -v "^Writing\|Warning" "$f" | tail -n 4; done
