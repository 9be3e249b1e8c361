#!/usr/bin/env bash
# The whole GPU check, as ONE command on the GPU machine, from the repository root (< 8 minutes):
#   bash tools/gpu-check.sh
# Needs the executables built here by tools/gpu-build.sh (.gpu/bin/*.xz) and, for the PyTorch peer,
# the wheels in .whl/ (diffusers + importlib_metadata): carry [".gpu", ".whl"].
#
# Runs: nvidia-smi; the cuda_ops and cuda_kernels tests (every CUDA op vs the CPU backend), the NCCL
# data plane's tests (nccl_comm, nccl_library), and the
# fused-vs-bridged mixed-dtype op bench; the gpu_golden test (tiny golden UNet, plain and
# Video-Infinity ranks, bf16 and f16 on the GPU); generate and verify on cuda:0; the full-size UNet
# bench (16 and 24 frames), again at 16 frames with VI_CONV=im2col and with VI_RESIDUAL=bf16 (the
# residual stream in bf16: what the f32 stream of docs/precision.md costs); the diffusers
# UNet3DConditionModel peer (same shapes, fp16, SDPA; VI_PEER_COMPILE=1 adds torch.compile).
# Logs go to $OUT (default .gpu/out, at most 8 files); a short table is printed last.
# Environment: VI_BENCH_FRAMES (default 16,24), VI_BENCH_ITERS (default 3), VI_COMM_BENCH=1 (also
# time a full-size step over the host path and over NCCL: see below).
# Transfer limit: the device tool sends the tracked tree + carried paths, 64 MiB in all. The tracked tree
# is ~55 MB (tests/golden), so the GPU sessions so far dropped the largest part no GPU stage reads
# (tests/golden/convert, 15 MB) from the index for the call only, and added it back right after:
#   git rm --cached -r -q tests/golden/convert && echo /tests/golden/convert/ >> .git/info/exclude
#   ... run ...; then remove that exclude line and `git add tests/golden/convert`.
set -uo pipefail
root=$(pwd)
OUT=${OUT:-$root/.gpu/out}
mkdir -p "$OUT"
t0=$(date +%s)
log() { echo "[gpu-check +$(($(date +%s) - t0))s] $*"; }
summary="$OUT/summary.txt"
: >"$summary"

nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" | head -20

# CUDA libraries: the pip wheels of the python that holds PyTorch, then system CUDA.
site=$(python3 -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null || true)
libdirs=""
for d in "$site"/nvidia/*/lib "$site"/nvidia/cu13/lib /usr/local/cuda*/lib64 /usr/local/nvidia/lib64; do
  [ -d "$d" ] && libdirs="$libdirs:$d"
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

# The executables have /work/main/tests/golden compiled in (the build machine's checkout).
if [ ! -e /work/main/tests/golden ]; then
  mkdir -p /work && ln -sfn "$root" /work/main
fi

bin=/tmp/vi-bin
mkdir -p "$bin"
if ! ls .gpu/bin/*.xz >/dev/null 2>&1; then
  echo "gpu-check: no .gpu/bin/*.xz: run tools/gpu-build.sh on the build machine and carry .gpu" >&2
  exit 2
fi
for f in .gpu/bin/*.xz; do
  n=$(basename "$f" .xz)
  xz -dc "$f" >"$bin/$n" && chmod +x "$bin/$n"
done

# run NAME LIMIT_S CMD...: log to $OUT/NAME.log, record the exit code, show the tail.
# LOG=GROUP run ...: append to $OUT/GROUP.log instead, under a "=== NAME ===" header ($OUT brings
# back at most 8 files).
run() {
  local name=$1 limit=$2
  shift 2
  local file="$OUT/${LOG:-$name}.log"
  log "$name (limit ${limit}s)"
  if [ -n "${LOG:-}" ]; then
    echo "=== $name ===" >>"$file"
    timeout "$limit" "$@" >>"$file" 2>&1
  else
    timeout "$limit" "$@" >"$file" 2>&1
  fi
  local rc=$?
  echo "$name rc=$rc log=${LOG:-$name}" >>"$summary"
  tail -n 15 "$file"
  return 0
}

# Both op test binaries share one log ($OUT brings back at most 8 files: nvidia-smi, summary,
# unit_tests, gpu_golden, cli_cuda, unet_bench, unet_bench_variants, peer).
: >"$OUT/unit_tests.log"
LOG=unit_tests run cuda_ops 60 env CUBLASLT_LOG_LEVEL=1 "$bin/cuda_ops" --nocapture
LOG=unit_tests run cuda_kernels 75 "$bin/cuda_kernels" --nocapture
# The NCCL data plane (design.md section 5.7): NcclComm against the in-process communicator bit for
# bit (one rank always; several ranks on several GPUs, or on GPU 0 when NCCL >= 2.30 allows it with
# NCCL_MULTI_RANK_GPU_ENABLE=1), and the library loader. libnccl.so.2 comes from LD_LIBRARY_PATH above
# (the nvidia-nccl wheel of the PyTorch python) or VI_NCCL_LIBRARY; a test that skips says why.
LOG=unit_tests run nccl_library 30 "$bin/nccl_library" --nocapture
LOG=unit_tests run nccl_comm 90 env NCCL_MULTI_RANK_GPU_ENABLE=1 NCCL_DEBUG=WARN "$bin/nccl_comm" --nocapture
# Fused vs bridged mixed-dtype ops (f32 stream / f32 bias next to bf16) at UNet sizes.
LOG=unit_tests run cuda_ops_mixed_bench 45 "$bin/cuda_ops" --ignored --nocapture mixed_throughput
# One process per golden case (a crash in one does not hide the others), one log file.
: >"$OUT/gpu_golden.log"
for t in unet_plain_bf16 unet_plain_f16 unet_vi_w2_nodyn_bf16 unet_vi_w2_nodyn_f16 \
  unet_vi_w3_t900_bf16 unet_vi_w3_t900_f16; do
  LOG=gpu_golden run "gpu_golden_$t" 30 "$bin/gpu_golden" --nocapture --exact "gpu::${t}_on_gpu"
done
# The command on the GPU: generate end to end (tiny model, 1 rank and 2 ranks sharing GPU 0; the
# full-size architecture with random weights when the binary knows `--model random-full`), and
# verify of golden files on the device. One log.
: >"$OUT/cli_cuda.log"
vi="$bin/video-infinity"
LOG=cli_cuda run generate_tiny_cuda0 60 "$vi" generate --model tiny --frames 16 --devices cuda:0 \
  --out /tmp/vi-tiny-1.mp4 --overwrite
LOG=cli_cuda run generate_tiny_cuda0x2 60 "$vi" generate --model tiny --frames 32 --devices cuda:0x2 \
  --out /tmp/vi-tiny-2.mp4 --overwrite
if "$vi" generate --help 2>/dev/null | grep -q random-full; then
  LOG=cli_cuda run generate_random_full_cuda0 150 "$vi" generate --model random-full --frames 16 \
    --steps 2 --devices cuda:0 --prompt "a test" --out /tmp/vi-full.mp4 --overwrite
fi
for g in unet_plain unet_vi_w3_t500 scheduler_sde_dpmpp_30 clip_text vae_decoder; do
  LOG=cli_cuda run "verify_${g}_cuda0" 60 "$vi" verify --golden "tests/golden/$g.safetensors" --device cuda:0
done
run unet_bench 120 env VI_BENCH_FRAMES="${VI_BENCH_FRAMES:-16,24}" VI_BENCH_ITERS="${VI_BENCH_ITERS:-3}" "$bin/unet"
# The same at 16 frames with the im2col + cuBLASLt convolutions instead of cuDNN, and with the
# residual stream in bf16 instead of f32 (what the precision policy of docs/precision.md costs).
# One log for both ($OUT: 8 files at most).
: >"$OUT/unet_bench_variants.log"
LOG=unet_bench_variants run unet_bench_im2col 45 env VI_CONV=im2col VI_BENCH_FRAMES=16 VI_BENCH_ITERS=3 "$bin/unet"
LOG=unet_bench_variants run unet_bench_bf16_stream 45 env VI_RESIDUAL=bf16 VI_BENCH_FRAMES=16 VI_BENCH_ITERS=3 "$bin/unet"
# VI_COMM_BENCH=1: what the exchange costs on a full-size step (random-full weights, 2 ranks x 24
# frames, 320x512, CFG 2, overlapped schedule): the same bench over the host path and over NCCL, on 2
# GPUs when there are (then also one rank on one GPU: comm share = (2-rank step - 1-rank step) / 2-rank
# step), else both ranks on GPU 0 (NCCL's multi-rank mode, NCCL >= 2.30; host = zero-copy hand-over,
# so the difference is NCCL's own cost). `bench: data plane ...` names the path taken. Off by default
# (up to ~6 minutes more); same log as the variants ($OUT: 8 files at most).
if [ "${VI_COMM_BENCH:-0}" = 1 ] && "$vi" bench --help 2>/dev/null | grep -q -- "--comm"; then
  ngpu=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
  pair=cuda:0x2
  [ "$ngpu" -ge 2 ] && pair=cuda:0-1
  for comm in host nccl; do
    LOG=unet_bench_variants run "comm_${comm}_${pair}" 120 env NCCL_MULTI_RANK_GPU_ENABLE=1 \
      "$vi" bench --model random-full --devices "$pair" --comm "$comm" --steps 2 --warmup 1
  done
  [ "$ngpu" -ge 2 ] &&
    LOG=unet_bench_variants run comm_one_rank 120 "$vi" bench --model random-full --devices cuda:0 \
      --steps 2 --warmup 1
fi

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >/tmp/pip.txt 2>&1 || { log "pip install of .whl failed:"; tail -5 /tmp/pip.txt; }
  peer_args=(--frames 16 24 --iters 3 --warmup 1)
  [ "${VI_PEER_COMPILE:-0}" = 1 ] && peer_args+=(--compile)
  run peer 120 env PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 tools/peer/diffusers_unet.py "${peer_args[@]}"
else
  log "no .whl/: PyTorch peer skipped"
fi

log "done"
python3 - "$OUT" <<'EOF'
import os, re, sys
out = sys.argv[1]
def read(name):
    p = os.path.join(out, name)
    return open(p, errors="replace").read() if os.path.exists(p) else ""
print("\n================ gpu-check summary ================")
def section(text, name):
    # The part of a grouped log under "=== name ===" (the whole text when there are no headers).
    if f"=== {name} ===" not in text:
        return text
    return text.split(f"=== {name} ===", 1)[1].split("\n=== ", 1)[0]
for line in read("summary.txt").split("\n"):
    if not line:
        continue
    name = line.split(" rc=")[0]
    fields = dict(x.split("=", 1) for x in line[len(name):].split() if "=" in x)
    rc = fields.get("rc", "?")
    text = section(read(fields.get("log", name) + ".log"), name)
    res = re.findall(r"test result: (\w+)\. (\d+) passed; (\d+) failed", text)
    extra = "; ".join(f"{r[0]}: {r[1]} passed, {r[2]} failed" for r in res)
    status = "OK" if rc == "0" else ("TIMEOUT" if rc in ("124", "137") else "FAIL")
    if status == "OK" and "SKIPPED" in text:
        status = "SKIPPED"  # a test or the bench found no usable GPU: see its log
    print(f"{name:<34} {status:<8} rc={rc:<4} {extra}")
def kv(line):
    return dict(x.split("=", 1) for x in line.split()[1:] if "=" in x)
ours = {kv(l)["frames"]: kv(l) for l in read("unet_bench.log").split("\n") if l.startswith("BENCH ")}
def bench(text):
    return {kv(l)["frames"]: kv(l) for l in text.split("\n") if l.startswith("BENCH ")}
variants = read("unet_bench_variants.log")
im2col = bench(section(variants, "unet_bench_im2col"))
bf16s = bench(section(variants, "unet_bench_bf16_stream"))
peer = {}
for l in read("peer.log").split("\n"):
    if l.startswith("PEER "):
        d = kv(l)
        peer[(d["mode"], d["frames"])] = d
print()
print(f"{'frames':>6} {'ours ms':>9} {'im2col ms':>9} {'bf16 str.':>9} {'peer eager':>11} {'peer comp.':>11} {'peer/ours':>10} {'TFLOP/s':>8} {'% peak':>7}  top-3 op kinds (ours)")
for f in sorted(set(ours) | {k[1] for k in peer}, key=int):
    o = ours.get(f, {})
    pe = peer.get(("eager", f), {})
    pc = peer.get(("compile", f), {})
    oms = float(o["median_ms"]) if o else None
    best_peer = min([float(d["median_ms"]) for d in (pe, pc) if d] or [0]) or None
    ratio = f"{best_peer / oms:.2f}x" if (oms and best_peer) else "-"
    print(f"{f:>6} {o.get('median_ms', '-'):>9} {im2col.get(f, {}).get('median_ms', '-'):>9} {bf16s.get(f, {}).get('median_ms', '-'):>9} {pe.get('median_ms', '-'):>11} {pc.get('median_ms', '-'):>11} "
          f"{ratio:>10} {o.get('tflops', '-'):>8} {o.get('peak_pct', '-'):>7}  {o.get('top3', '-')}")
print("(ms per CFG batch-2 pass at 40x64 latent; 786 GFLOP per frame-pass; peak 989 TFLOP/s; "
      "peer/ours > 1 means ours is faster; bf16 str. = residual stream in bf16, VI_RESIDUAL=bf16)")
def kinds(text):
    # {frames: {op kind: ms}} from the bench's per-op-kind tables ("F = 16: ..." then "  kind ms % calls").
    out = {}
    for chunk in text.split("\nF = ")[1:]:
        rows = {}
        for l in chunk.split("\n")[2:]:
            p = l.split()
            if len(p) != 4 or not l.startswith("  "):
                break
            rows[p[0]] = p[1]
        out[chunk.split(":")[0].strip()] = rows
    return out
for name, text in (("ours", read("unet_bench.log")), ("bf16 s", section(variants, "unet_bench_bf16_stream"))):
    for f, rows in kinds(text).items():
        shown = ", ".join(f"{k} {rows[k]} ms" for k in ("binary", "group_norm", "layer_norm", "linear") if k in rows)
        print(f"{name:>6} F={f}: {shown}")
EOF
