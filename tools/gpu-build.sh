#!/usr/bin/env bash
# Builds, on THIS machine (no GPU needed), the GPU test and bench executables that tools/gpu-check.sh
# runs on the GPU machine, and puts them, stripped and xz-compressed, in .gpu/bin/ (git-ignored).
#
#   usage: tools/gpu-build.sh            (from anywhere; works in the repository root)
#
# * nvcc: taken from CUDA_PATH / PATH, else installed by tools/install-cuda-toolchain.sh.
# * Separate target dir (target/gpu) and the release profile, so the shared dev target is untouched;
#   kernels for sm_90 only, no PTX (VI_CUDA_ARCHS=90 VI_CUDA_PTX=0): the H100 / H200 are sm_90.
# * Executables: cuda_ops + cuda_kernels + nccl_comm + nccl_library (runtime/tests), gpu_golden
#   (tests/), the unet bench
#   (benches/), the video-infinity CLI. Their golden/manifest paths are compiled in as
#   /work/main/...; gpu-check.sh links that path to its checkout when it differs.
# Prints, last, the carry list and the device command.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_PATH:-}" ]; then
  eval "$(tools/install-cuda-toolchain.sh)"
fi
export VI_CUDA_ARCHS=90 VI_CUDA_PTX=0 CARGO_TARGET_DIR="$root/target/gpu"
json=$(mktemp)
trap 'rm -f "$json"' EXIT

echo "== building GPU executables (release, target/gpu, sm_90) ==" >&2
cargo test --release --features cuda -p vi-runtime --test cuda_ops --test cuda_kernels \
  --test nccl_comm --test nccl_library --no-run \
  --message-format=json-render-diagnostics >>"$json"
cargo test --release --features cuda -p vi-suite --test gpu_golden --no-run \
  --message-format=json-render-diagnostics >>"$json"
cargo bench --features cuda -p vi-suite --bench unet --no-run \
  --message-format=json-render-diagnostics >>"$json"
cargo build --release --features cuda -p video-infinity --bin video-infinity \
  --message-format=json-render-diagnostics >>"$json"

rm -rf .gpu/bin
mkdir -p .gpu/bin
python3 - "$json" <<'EOF'
import json, shutil, sys
want = {"cuda_ops", "cuda_kernels", "nccl_comm", "nccl_library", "gpu_golden", "unet", "video-infinity"}
found = {}
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        name = m["target"]["name"]
        if name in want:
            found[name] = m["executable"]
missing = want - set(found)
if missing:
    sys.exit(f"gpu-build: executables not produced: {sorted(missing)}")
for name, exe in sorted(found.items()):
    shutil.copy(exe, f".gpu/bin/{name}")
    print(f"{name}: {exe}", file=sys.stderr)
EOF
for f in .gpu/bin/*; do
  strip "$f"
  xz -T2 -6 "$f"
done
ls -la .gpu/bin >&2
total=$(du -cb .gpu/bin/*.xz | tail -1 | cut -f1)
echo "total $((total / 1024)) KiB" >&2
if [ "$total" -gt $((12 * 1024 * 1024)) ]; then
  echo "gpu-build: WARNING: .gpu/bin is over 12 MiB" >&2
fi
[ -d .whl ] || echo "gpu-build: NOTE: .whl/ (diffusers wheels for the peer) missing: the peer will be skipped" >&2
echo "carry: [\".gpu\", \".whl\"]"
echo "device command: bash tools/gpu-check.sh"
