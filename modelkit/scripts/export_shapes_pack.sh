#!/usr/bin/env bash
# Export the shapes demo pack (models/shapes): the last command of docs/demo-pack.md step 3, with
# the pack's domain text (the same string as modelkit.defaults.SHAPES_DOMAIN, which a test checks).
# Run from the repository root after steps 1-3; extra arguments are passed on (e.g. --force).
# CHECKPOINT, DECODER and OUT override the paths of the recipe.
set -eu
CHECKPOINT=${CHECKPOINT:-modelkit/.work/vlm-cpu/final}
DECODER=${DECODER:-modelkit/.work/decoder-v2.safetensors}
OUT=${OUT:-models/shapes}
exec "${PYTHON:-python}" -m modelkit export --checkpoint "$CHECKPOINT" --mask-decoder "$DECODER" \
  --out "$OUT" --name shapes --dtype fp16 --min-pixels 16384 --max-pixels 81920 --describe-mode crop \
  --domain "synthetic scenes of circles, squares, triangles and stars in six colours on light backgrounds (128-640 px images); not a general-purpose model" \
  "$@"
