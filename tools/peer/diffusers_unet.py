#!/usr/bin/env python3
"""PyTorch peer of benches/unet.rs: diffusers' UNet3DConditionModel at the VideoCrafter2 UNet size.

Same shapes as our bench: config of tests/golden/manifests/videocrafter2_unet_diffusers.json
(block_out_channels 320/640/1280/1280, 2 layers per block, cross-attention dim 1024), random weights
(PyTorch's default init), 320x512 video -> latent 40x64, CFG batch 2, F frames, text states
[2, 77, 1024], fp16 (or --dtype bf16), attention through SDPA (diffusers' AttnProcessor2_0).

Heads: diffusers' UNet3DConditionModel turns `attention_head_dim=64` into 64 HEADS per block (its
documented naming issue), i.e. head_dim 5..20; VideoCrafter2 uses head_dim 64 (5/10/20/20 heads).
After construction every block attention is switched to head_dim 64 (`attn.heads = inner_dim // 64`,
`attn.scale = 64**-0.5`): same weights and FLOPs, the head split of VideoCrafter2, so SDPA runs its
flash kernel as it would for the real model. transformer_in keeps 8 heads x 64.
Not modelled: VideoCrafter2's fps embedding (one tiny MLP on [2, 1280]).

Timing: warm-up passes, then timed passes bracketed by torch.cuda.synchronize(); median ms.
Work: 786 GFLOP per frame per pass (one latent frame of one batch row); a CFG batch-2 pass over F
frames is 2F frame-passes. Prints `PEER mode=... frames=... median_ms=...` lines (parsed by
tools/gpu-check.sh).

usage: diffusers_unet.py [--frames 16 24] [--iters 3] [--warmup 1] [--compile] [--dtype fp16|bf16]
"""
import argparse
import json
import os
import statistics
import sys
import time

GFLOP_PER_FRAME = 786.0
PEAK_TFLOPS = 989.0


def build(cfg, dtype, torch):
    from diffusers import UNet3DConditionModel

    # Parameters are initialised directly on the GPU (PyTorch's default init; CPU init of 1.4 B
    # parameters would take a minute).
    with torch.device("cuda"):
        unet = UNet3DConditionModel(
            sample_size=cfg.get("sample_size", 64),
            in_channels=cfg["in_channels"],
            out_channels=cfg["out_channels"],
            down_block_types=tuple(cfg["down_block_types"]),
            up_block_types=tuple(cfg["up_block_types"]),
            block_out_channels=tuple(cfg["block_out_channels"]),
            layers_per_block=cfg["layers_per_block"],
            downsample_padding=cfg["downsample_padding"],
            mid_block_scale_factor=cfg["mid_block_scale_factor"],
            act_fn=cfg["act_fn"],
            norm_num_groups=cfg["norm_num_groups"],
            norm_eps=cfg["norm_eps"],
            cross_attention_dim=cfg["cross_attention_dim"],
            attention_head_dim=cfg["attention_head_dim"],
        )
    from diffusers.models.attention_processor import Attention

    head_dim = cfg["attention_head_dim"]
    switched = 0
    for name, m in unet.named_modules():
        if isinstance(m, Attention) and not name.startswith("transformer_in"):
            inner = m.to_q.out_features
            m.heads = inner // head_dim
            m.scale = head_dim**-0.5
            if hasattr(m, "inner_dim"):
                m.inner_dim = inner
            switched += 1
    nparams = sum(p.numel() for p in unet.parameters())
    unet = unet.to(device="cuda", dtype=dtype).eval()
    return unet, nparams, switched


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, nargs="+", default=[16, 24])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(unet)")
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument(
        "--manifest",
        default=os.path.join(
            os.path.dirname(os.path.abspath(__file__)),
            "../../tests/golden/manifests/videocrafter2_unet_diffusers.json",
        ),
    )
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("SKIPPED: no CUDA device for the PyTorch peer")
        return 0
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    cfg = json.load(open(args.manifest))["config"]
    torch.manual_seed(0)
    t0 = time.time()
    unet, nparams, switched = build(cfg, dtype, torch)
    print(
        f"peer: diffusers UNet3DConditionModel, {nparams / 1e9:.3f} B parameters, {args.dtype}, "
        f"{switched} attentions at head_dim {cfg['attention_head_dim']}, built in {time.time() - t0:.1f} s; "
        f"torch {torch.__version__}, {torch.cuda.get_device_name()}",
        flush=True,
    )
    modes = [("eager", unet)]
    if args.compile:
        modes.append(("compile", torch.compile(unet)))
    for mode, model in modes:
        for f in args.frames:
            g = torch.Generator(device="cuda").manual_seed(1)
            sample = torch.randn(2, 4, f, 40, 64, device="cuda", dtype=dtype, generator=g)
            ehs = torch.randn(2, 77, cfg["cross_attention_dim"], device="cuda", dtype=dtype, generator=g)
            t = torch.tensor([500, 500], device="cuda")

            def run():
                with torch.inference_mode():
                    out = model(sample, t, ehs, return_dict=False)[0]
                torch.cuda.synchronize()
                return out

            tw = time.time()
            for _ in range(max(args.warmup, 1 if mode == "compile" else 0)):
                run()
            warm_s = time.time() - tw
            times = []
            for _ in range(args.iters):
                ts = time.perf_counter()
                out = run()
                times.append((time.perf_counter() - ts) * 1e3)
            assert tuple(out.shape) == (2, 4, f, 40, 64), out.shape
            ms = statistics.median(times)
            tflops = GFLOP_PER_FRAME * 2 * f / ms
            mem = torch.cuda.max_memory_allocated() / 2**30
            print(
                f"PEER mode={mode} frames={f} median_ms={ms:.2f} min_ms={min(times):.2f} "
                f"tflops={tflops:.1f} peak_pct={100 * tflops / PEAK_TFLOPS:.1f} "
                f"warmup_s={warm_s:.1f} max_mem_gib={mem:.1f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
