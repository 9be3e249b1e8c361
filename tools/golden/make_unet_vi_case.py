#!/usr/bin/env python3
"""Video-Infinity golden cases (kind `unet3d` with plugin settings) from the REFERENCE implementation.

Runs the tiny UNetVideoCrafter (Video-Infinity's `src/video_crafter.py`, diffusers' UNet3DConditionModel)
with Video-Infinity's own plugins (`src/video_infinity/wrapper.py` DistWrapper + `plugins.py`) mounted, one
CPU process per rank on a torch.distributed gloo group (127.0.0.1), as tests/golden/README.md
("Cases 2, 3 and extra: Video-Infinity") describes. Nothing here re-implements a plugin: the numbers are the
reference code's.

Needs (outside this repository; none of it is vendored):
  * a Python 3.11 environment with torch 2.15.0, diffusers 0.42.1, transformers 5.24.0, safetensors 0.8.0,
    numpy 2.4.6 and imageio (imported by Video-Infinity's src/tools.py);
  * Video-Infinity's source at commit acfcd17 (github Yuanshi9815/Video-Infinity), e.g. unpacked with
    `git archive acfcd17 | tar -x -C DIR`. diffusers 0.42 moved `pipelines.text_to_video_synthesis` under
    `pipelines.deprecated`; the module is aliased to its new place before `src/video_crafter.py` is
    imported (the file itself is used unmodified).

Usage:
  # Re-run an existing case from its own inputs and compare with its stored outputs (proves the setup):
  python make_unet_vi_case.py --vi-src DIR replay tests/golden/unet_vi_w2_nodyn.safetensors
  # Write a new case (model config and weights taken from an existing case and the weights file it names):
  python make_unet_vi_case.py --vi-src DIR make --like tests/golden/unet_vi_w2_nodyn.safetensors \
      --world 1 --frames 8 --hw 8 8 --timestep 900 --seed 300 \
      --plugin-configs '{"attn": {...}, "conv_layer": {}}' --out tests/golden/unet_vi_w1_nodyn.safetensors

`make` also re-runs the whole process group in float64 (the `precision` metadata) and the same chunks through
the model without plugins (`max_abs_diff_vs_same_chunk_without_plugins`), as the other cases record.
"""
import argparse
import datetime
import hashlib
import importlib
import json
import os
import platform
import socket
import sys
import tempfile
import types

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_file, save_file

VI_COMMIT = "acfcd17c25cd0b47ae743a144afbad39bb48b5f2"


# ---- the reference code ----

def import_reference(vi_src):
    """Video-Infinity's UNetVideoCrafter and DistWrapper, from an unpacked checkout at `vi_src`."""
    old = "diffusers.pipelines.text_to_video_synthesis"
    if old not in sys.modules:
        new = "diffusers.pipelines.deprecated.text_to_video_synthesis"
        sys.modules[old] = importlib.import_module(new)
        sys.modules[old + ".pipeline_text_to_video_synth"] = importlib.import_module(
            new + ".pipeline_text_to_video_synth")
    if vi_src not in sys.path:
        sys.path.insert(0, vi_src)
    from src.video_crafter import UNetVideoCrafter
    from src.video_infinity.wrapper import DistWrapper
    return UNetVideoCrafter, DistWrapper


def weights_content_sha256(state):
    """Golden README: sha256 over every tensor in byte-wise sorted name order, each fed as
    `name NUL dtype NUL json(shape) NUL raw-little-endian-bytes`."""
    h = hashlib.sha256()
    for k in sorted(state, key=lambda s: s.encode()):
        a = state[k].numpy()
        h.update(k.encode() + b"\0" + str(a.dtype).encode() + b"\0" + json.dumps(list(a.shape)).encode()
                 + b"\0" + a.astype(a.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


def build_unet(vi_src, config, weights_path, expect_sha=None):
    """The tiny UNetVideoCrafter from a `config` metadata dict and the `weight/<key>` tensors."""
    UNetVideoCrafter, _ = import_reference(vi_src)
    state = load_file(weights_path)
    sha = weights_content_sha256(state)
    if expect_sha is not None and sha != expect_sha:
        raise SystemExit(f"{weights_path}: weights content sha256 {sha}, the case names {expect_sha}")
    unet = UNetVideoCrafter(**{k: v for k, v in config.items() if not k.startswith("_")})
    params = {k[len("weight/"):]: v for k, v in state.items() if k.startswith("weight/")}
    unet.load_state_dict(params, strict=True)
    return unet.eval(), sha


def install_fps_hook(unet, fps):
    """What VideoCrafterPipeline.__call__ installs (src/video_crafter.py `post_function`): the fps
    embedding added to the output of time_embedding.linear_2, repeated to the batch."""
    def post_function(sample):
        f = torch.tensor([fps], dtype=torch.float64, device=sample.device)
        fps_emb = unet.fps_proj(f).to(sample.device, dtype=unet.dtype)
        fps_emb = unet.fps_embedding(fps_emb).repeat_interleave(repeats=sample.shape[0], dim=0)
        sample += fps_emb
        return sample
    unet.time_embedding.post_act = post_function


class Controller:
    """The fields of Video-Infinity's DistController the plugins read, on a gloo group already set up
    (DistController itself insists on NCCL and a CUDA device)."""

    def __init__(self, rank, world_size):
        self.rank, self.world_size, self.is_master = rank, world_size, rank == 0
        self.device = torch.device("cpu")
        self.adj_groups = [dist.new_group([i, i + 1]) for i in range(world_size - 1)]


def mount(vi_src, unet, world, rank, plugin_configs):
    """DistWrapper mounted as inference() does: plugins mounted in __init__ and again, then the
    plugin configs set in the global state."""
    _, DistWrapper = import_reference(vi_src)
    ctrl = Controller(rank, world)
    wrapper = DistWrapper(types.SimpleNamespace(unet=unet), ctrl, {})
    wrapper.plugin_mount()
    wrapper.global_state.set("plugin_configs", plugin_configs)
    return wrapper


def mounted_module_names(unet):
    """The module names DistWrapper's attn / conv_layer mounts select, in its order."""
    attn, conv = [], []
    for name, m in unet.named_modules():
        if "temp_" in name or "transformer_in" in name:
            if m.__class__.__name__ == "Attention":
                attn.append(name)
            elif m.__class__.__name__ == "TemporalConvLayer":
                conv.append(name)
    return attn, conv


def attention_heads(unet):
    """[heads, head_dim] per block, as diffusers built it (the `attention_heads` metadata)."""
    out = {}

    def add(key, attn):
        pair = [attn.heads, attn.to_q.out_features // attn.heads]
        if pair not in out.setdefault(key, []):
            out[key].append(pair)

    for name, m in unet.named_modules():
        if m.__class__.__name__ != "Attention":
            continue
        parts = name.split(".")
        if parts[0] == "transformer_in":
            add("transformer_in", m)
        else:
            block = parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])
            kind = "temporal" if "temp_attentions" in name else "spatial"
            add(f"{block}.{kind}", m)
    return out


# ---- one rank ----

def rank_main(rank, world, port, job_path, result_dir):
    job = json.load(open(job_path))
    torch.set_num_threads(job["threads"])
    torch.cuda.synchronize = lambda *a, **k: None  # the plugins call it after every exchange
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10))
    try:
        inputs = load_file(job["inputs"])
        unet, _ = build_unet(job["vi_src"], job["config"], job["weights"], job["weights_sha"])
        install_fps_hook(unet, job["fps"])
        mount(job["vi_src"], unet, world, rank, job["plugin_configs"])
        t = torch.tensor(job["timestep"], dtype=torch.int64)  # 0-dim, as the pipeline passes it
        out = {}
        dtypes = [torch.float32] + ([torch.float64] if job["float64"] else [])
        for dt in dtypes:
            unet.to(dt)
            sample = inputs[f"in/sample/rank{rank}"].to(dt)
            ehs = inputs[f"in/encoder_hidden_states/rank{rank}"].to(dt)
            with torch.no_grad():
                y = unet(sample, t, encoder_hidden_states=ehs).sample
            assert y.dtype == dt and torch.isfinite(y).all()
            out["f32" if dt == torch.float32 else "f64"] = y.contiguous()
        save_file(out, os.path.join(result_dir, f"rank{rank}.safetensors"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(vi_src, config, weights, weights_sha, world, plugin_configs, timestep, fps, inputs,
              threads, float64):
    """Every rank's UNet output (f32, and f64 when asked): {rank: {"f32": t, "f64": t}}."""
    with tempfile.TemporaryDirectory() as tmp:
        in_path = os.path.join(tmp, "inputs.safetensors")
        save_file({k: v.contiguous() for k, v in inputs.items()}, in_path)
        job = dict(vi_src=vi_src, config=config, weights=weights, weights_sha=weights_sha,
                   plugin_configs=plugin_configs, timestep=timestep, fps=fps, inputs=in_path,
                   threads=threads, float64=float64)
        job_path = os.path.join(tmp, "job.json")
        json.dump(job, open(job_path, "w"))
        mp.spawn(rank_main, args=(world, free_port(), job_path, tmp), nprocs=world, join=True)
        return {r: load_file(os.path.join(tmp, f"rank{r}.safetensors")) for r in range(world)}


# ---- files ----

def read_case(path):
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return meta, tensors


def stats(got, want):
    d = (got.double() - want.double())
    return dict(max_abs=d.abs().max().item(), rel_l2=(d.norm() / want.double().norm()).item(),
                bit_exact=bool(torch.equal(got, want)))


def library_versions():
    import diffusers
    import safetensors
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "numpy": np.__version__}


def cmd_replay(a):
    meta, t = read_case(a.case)
    case, config = json.loads(meta["case"]), json.loads(meta["config"])
    world = case["world_size"]
    weights = os.path.join(os.path.dirname(a.case), meta["weights_file"])
    inputs = {k: v for k, v in t.items() if k.startswith("in/sample/") or k.startswith("in/encoder_hidden")}
    timestep, fps = int(t["in/timestep"][0]), int(t["in/fps"][0])
    assert timestep == case["timestep"]
    outs = run_group(a.vi_src, config, weights, meta["weights_content_sha256"], world,
                     case["plugin_configs"], timestep, fps, inputs, a.threads, True)
    recorded = json.loads(meta.get("precision", "{}"))
    worst = 0.0
    for r in range(world):
        name = f"out/sample/rank{r}"
        want = t[name]
        s = stats(outs[r]["f32"], want)
        worst = max(worst, s["rel_l2"])
        print(f"{os.path.basename(a.case)} {name}: f32 replay vs stored: max abs diff {s['max_abs']:.3e}, "
              f"rel L2 {s['rel_l2']:.3e}, bit-exact {s['bit_exact']}")
        # The stored f32 output against this float64 re-run reproduces the case's own precision
        # record (its f32 vs f64 difference) when both ran the same computation.
        d = (want.double() - outs[r]["f64"]).abs()
        rec = recorded.get(name, {})
        print(f"  stored f32 vs f64 replay: max abs {d.max().item():.12e} (recorded "
              f"{rec.get('max_abs_diff_f32_vs_f64', float('nan')):.12e}), mean abs {d.mean().item():.12e} "
              f"(recorded {rec.get('mean_abs_diff_f32_vs_f64', float('nan')):.12e}); "
              f"f32 replay vs f64 replay: max abs {(outs[r]['f32'].double() - outs[r]['f64']).abs().max().item():.3e}")
    print(f"replay: worst rel L2 {worst:.3e} ({'OK' if worst <= 1e-6 else 'MISMATCH'})")
    return 0 if worst <= 1e-6 else 1


def cmd_make(a):
    like_meta, _ = read_case(a.like)
    config = json.loads(like_meta["config"])
    weights = os.path.join(os.path.dirname(a.like), like_meta["weights_file"])
    sha = like_meta["weights_content_sha256"]
    plugin_configs = json.loads(a.plugin_configs)
    world, n, (h, w), batch = a.world, a.frames, a.hw, 2
    attn_pad = plugin_configs.get("attn", {}).get("padding", 24)
    conv_pad = plugin_configs.get("conv_layer", {}).get("padding", 4)
    # README "Constraints found in the reference".
    if attn_pad > n or n < conv_pad:
        raise SystemExit(f"frames per rank {n} must be >= attn padding {attn_pad} and conv padding {conv_pad}")

    g = torch.Generator().manual_seed(a.seed)
    video = torch.randn(batch, config["in_channels"], world * n, h, w, generator=g)
    uncond = torch.randn(1, 77, config["cross_attention_dim"], generator=g)
    prompts = torch.randn(2, 77, config["cross_attention_dim"], generator=g)
    # inference.py: prompt_id = int(rank / world_size * len(prompts)).
    cond_index = [int(r / world * len(prompts)) for r in range(world)] if world > 1 else [0]
    inputs = {}
    for r in range(world):
        inputs[f"in/sample/rank{r}"] = video[:, :, r * n:(r + 1) * n].contiguous()
        inputs[f"in/encoder_hidden_states/rank{r}"] = torch.cat([uncond, prompts[cond_index[r]:cond_index[r] + 1]])
    outs = run_group(a.vi_src, config, weights, sha, world, plugin_configs, a.timestep, a.fps, inputs,
                     a.threads, True)

    # The same chunks through the model without plugins, and the precision record.
    plain, _ = build_unet(a.vi_src, config, weights, sha)
    install_fps_hook(plain, a.fps)
    attn_names, conv_names = mounted_module_names(plain)
    assert (len(attn_names), len(conv_names)) == (34, 22), (len(attn_names), len(conv_names))
    heads = attention_heads(plain)
    assert heads == json.loads(like_meta["attention_heads"]), heads
    precision = {}
    tensors = dict(inputs)
    for r in range(world):
        y32, y64 = outs[r]["f32"], outs[r]["f64"]
        with torch.no_grad():
            y_plain = plain(inputs[f"in/sample/rank{r}"], torch.tensor(a.timestep),
                            encoder_hidden_states=inputs[f"in/encoder_hidden_states/rank{r}"]).sample
        d = (y32.double() - y64).abs()
        big = y64.abs() >= 1e-2
        precision[f"out/sample/rank{r}"] = {
            "max_abs_diff_f32_vs_f64": d.max().item(),
            "mean_abs_diff_f32_vs_f64": d.mean().item(),
            "max_rel_diff_f32_vs_f64_where_abs_ge_1e-2": (d[big] / y64.abs()[big]).max().item(),
            "max_abs_value": y64.abs().max().item(),
            "mean_abs_value": y64.abs().mean().item(),
            "max_abs_diff_vs_same_chunk_without_plugins": (y32 - y_plain).abs().max().item(),
        }
        tensors[f"out/sample/rank{r}"] = y32
    tensors["in/timestep"] = torch.tensor([a.timestep], dtype=torch.int64)
    tensors["in/fps"] = torch.tensor([a.fps], dtype=torch.int64)

    ap = plugin_configs.get("attn", {})
    if not ap.get("dynamic_scale", False):
        phase = "none (dynamic_scale false)"
    else:
        phase = "global" if a.timestep >= ap["global_phase"]["t"] else "local"
    case = {
        "world_size": world, "frames_per_rank": n, "latent_hw": [h, w], "batch": batch,
        "plugin_configs": plugin_configs, "timestep": a.timestep, "fps": a.fps, "phase": phase,
        "seeds": {"weights": json.loads(like_meta["case"])["seeds"]["weights"], "inputs": a.seed},
        "cond_prompt_index_per_rank": cond_index,
        "mounted_plugins": {"unet": "UNetPlugin on the whole UNet (records timestep)",
                            "attn_modules_in_mount_order": attn_names,
                            "conv_layer_modules_in_mount_order": conv_names},
        "process_group": "torch.distributed gloo, MASTER_ADDR 127.0.0.1, one CPU process per rank; "
                         "adj_groups = [new_group([i, i+1]) for i in range(W-1)]",
        "notes": a.notes,
    }
    reference = {"generator": "tools/golden/make_unet_vi_case.py (this repository)",
                 "libraries": library_versions(), "video_infinity_commit": VI_COMMIT,
                 "device": "cpu", "torch_num_threads": a.threads}
    desc = {
        "in/sample/rank<r>": "[B=2, 4, F_local, h, w] float32 latent chunk held by rank r (frames "
                             "r*F_local .. (r+1)*F_local-1 of the long video); rows 0/1 = uncond/cond CFG rows "
                             "(different values)",
        "in/encoder_hidden_states/rank<r>": "[B=2, 77, cross_attention_dim]; row 0 (uncond) identical on all "
                                            "ranks; row 1 (cond) = prompt case.cond_prompt_index_per_rank[r]",
        "in/timestep": "[1] int64; same on every rank",
        "in/fps": "[1] int64",
        "out/sample/rank<r>": "[B=2, 4, F_local, h, w] float32 output of rank r's UNet forward with the plugins",
    }
    meta = {"kind": "unet3d", "config": like_meta["config"], "case": json.dumps(case),
            "reference": json.dumps(reference), "tensors": json.dumps(desc),
            "precision": json.dumps(precision), "weights_file": like_meta["weights_file"],
            "weights_content_sha256": sha, "attention_heads": like_meta["attention_heads"]}
    save_file({k: v.contiguous() for k, v in tensors.items()}, a.out, metadata=meta)
    print(json.dumps(precision, indent=1))
    print(f"wrote {a.out} ({os.path.getsize(a.out)} bytes)")
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vi-src", required=True, help=f"Video-Infinity source tree at commit {VI_COMMIT[:7]}")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per rank process (1 reproduces the stored cases bit-exactly)")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("replay", help="re-run an existing case and compare with its outputs")
    r.add_argument("case")
    m = sub.add_parser("make", help="write a new case")
    m.add_argument("--like", required=True, help="existing case whose config and weights file are used")
    m.add_argument("--world", type=int, required=True)
    m.add_argument("--frames", type=int, required=True, help="frames per rank")
    m.add_argument("--hw", type=int, nargs=2, required=True, metavar=("H", "W"))
    m.add_argument("--timestep", type=int, required=True)
    m.add_argument("--fps", type=int, default=24)
    m.add_argument("--seed", type=int, required=True)
    m.add_argument("--plugin-configs", required=True, help="JSON, exactly as passed to the plugins")
    m.add_argument("--notes", default="")
    m.add_argument("--out", required=True)
    a = p.parse_args()
    a.vi_src = os.path.abspath(a.vi_src)
    return cmd_replay(a) if a.cmd == "replay" else cmd_make(a)


if __name__ == "__main__":
    sys.exit(main())
