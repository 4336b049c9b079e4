#!/usr/bin/env bash
# Train the demo VLM on a CUDA machine from fresh synthetic scenes: three configurations side by
# side (the tiny model leaves a GPU mostly idle, so parallel runs cost little), weights-only saves
# (<OUT>/<run>/training_state.pt, ~15 MB each) that `train-vlm --resume` turns into checkpoints.
# Run from the repository root; carried wheels in .whl/ (transformers pinned as here) are used first.
set -u
OUT=${OUT:-out/gpu}
MINUTES=${MINUTES:-7.5}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/modelkit PYTHONUNBUFFERED=1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
nvidia-smi -L 2>/dev/null

run() {
  local name=$1
  shift
  python3 -m modelkit train-vlm --device "$DEVICE" --light --out "$OUT/$name" --minutes "$MINUTES" \
    --save-every 60 --workers 4 --coord-step 10 --text-layers 6 "$@" >"$OUT/$name.log" 2>&1 &
}
run r1 --seed 1 --stream-seed 101 --batch 128 --lr 2e-3
run r2 --seed 2 --stream-seed 102 --batch 256 --lr 2e-3
run r3 --seed 3 --stream-seed 103 --batch 128 --lr 1e-3 --warmup 300
(sleep 150 && nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv) &
wait
for f in "$OUT"/*.log; do echo "== $f"; grep -v "^Writing\|Warning" "$f" | tail -n 4; done
