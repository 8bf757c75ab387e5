"""The pure-torch training step (training/loop.py) on one GPU: samples/s and MFU.

One step = what a Ray Train worker does per global batch: uint8 images normalised on the device,
both towers forward under autocast, CLIP's symmetric InfoNCE, backward, fused AdamW, LR schedule,
temperature clamp. Inputs are synthetic and already on the GPU (this times the step, not ingest:
benchmarks/ingest.py times that). Captions have CC3M-like lengths (6-25 BPE tokens) unless
`--captions full`; the text tower runs up to the longest caption of the batch, and the FLOPs
counted are the ones executed (training/flops.py; MFU = 3 x forward FLOPs x samples/s / peak).

Runs bare on a GPU machine: needs torch and numpy only (no Ray, pyarrow or pydantic). Without a
CUDA device it says so and exits 0, unless `--device cpu` asks for a CPU smoke run.

    python benchmarks/train_step.py                       # ViT-B-32 and ViT-B-16, eager then compiled
    python benchmarks/train_step.py --no-compile --models ViT-B-32 --batch 512
    python benchmarks/train_step.py --models ViT-B-32 --batch 1024 2048 --compile-mode max-autotune-no-cudagraphs
    python benchmarks/train_step.py --device cpu --models ViT-Tiny --batch 16 --steps 3 --no-compile

Eager runs come first; compiled runs follow while `--time-budget` seconds allow (compilation takes
a minute or two per model). Every result prints as it is measured, and as a JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_BATCH = {"ViT-B-32": 1024, "ViT-B-16": 512}


def _allow_missing_safetensors() -> None:
    """training.model imports safetensors for checkpoint I/O, which this script never does; on a
    bare GPU machine without it, register a module that fails only if something tries to use it."""
    if importlib.util.find_spec("safetensors") is not None:
        return

    def unavailable(*_args, **_kwargs):
        raise RuntimeError("safetensors is not installed on this machine (train_step.py does not save weights)")

    package, sub = types.ModuleType("safetensors"), types.ModuleType("safetensors.torch")
    sub.load_file = sub.save_file = unavailable
    package.torch = sub
    sys.modules.update({"safetensors": package, "safetensors.torch": sub})


def synthetic_batch(batch: int, image_size: int, context_length: int, captions: str, device, seed: int = 0):
    """uint8 images [B, S, S, 3] and token ids [B, context_length] (SOT, ids, EOT, zeros)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    images = torch.randint(0, 256, (batch, image_size, image_size, 3), generator=g, dtype=torch.uint8)
    tokens = torch.zeros(batch, context_length, dtype=torch.long)
    for i in range(batch):
        n = context_length - 2 if captions == "full" else int(torch.randint(6, 26, (1,), generator=g))
        tokens[i, 0] = 49406
        tokens[i, 1 : n + 1] = torch.randint(1, 49000, (n,), generator=g)
        tokens[i, n + 1] = 49407
    return images.to(device), tokens.to(device)


def executed_text_tokens(tokens, context_length: int) -> int:
    """Positions the text tower runs: up to the last end-of-text, rounded up to 8 (the model's trim)."""
    last = int(tokens.argmax(dim=-1).max()) + 1
    return min(context_length, -(-last // 8) * 8)


def run_one(
    name: str, batch: int, *, steps: int, warmup: int, precision: str, compile_model, captions: str, device
) -> dict:
    """compile_model: False (eager), True or a torch.compile mode (`train.compile`'s values)."""
    import torch

    from training.flops import clip_forward_flops, mfu, peak_flops
    from training.loop import LoopSettings, TrainLoop
    from training.model import create_model

    torch.manual_seed(0)
    clip = create_model(name)
    loop = TrainLoop(
        clip,
        LoopSettings(total_steps=10 * (steps + warmup), lr=5e-4, warmup=1, precision=precision, compile=compile_model),
        device,
    )
    images, tokens = synthetic_batch(batch, clip.image_size, clip.context_length, captions, device)
    # Compiled, the text tower runs every position (the trim is a data-dependent shape); eager, it
    # stops after the batch's longest caption.
    text_tokens = clip.context_length if compile_model else executed_text_tokens(tokens, clip.context_length)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_compile = time.perf_counter()
    for _ in range(warmup):
        result = loop.step(images, tokens)
    sync()
    warmup_s = time.perf_counter() - t_compile
    t0 = time.perf_counter()
    for _ in range(steps):
        result = loop.step(images, tokens)
    sync()
    elapsed = time.perf_counter() - t0
    loss = float(result.loss)
    if not math.isfinite(loss):
        raise RuntimeError(f"{name}: the loss is {loss}")
    samples_per_s = batch * steps / elapsed
    flops = clip_forward_flops(clip.config, text_tokens=text_tokens)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(device_name, precision) if device.type == "cuda" else None
    out = {
        "model": name,
        "batch": batch,
        "precision": precision,
        "compile": compile_model,
        "captions": captions,
        "text_tokens": text_tokens,
        "steps": steps,
        "step_s": elapsed / steps,
        "samples_per_s": samples_per_s,
        "forward_gflops_per_sample": flops["total"] / 1e9,
        "achieved_tflops": 3 * flops["total"] * samples_per_s / 1e12,
        "mfu": mfu(samples_per_s, flops["total"], peak),
        "peak_tflops": None if peak is None else peak / 1e12,
        "warmup_s": warmup_s,
        "loss": loss,
        "device": device_name,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    del loop, clip, images, tokens
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    parser.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=None,
        help="per-step batch, one or more (default: 1024 for B/32, 512 for B/16)",
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", default="amp_bf16", choices=["fp32", "amp_bf16", "amp_fp16"])
    parser.add_argument("--captions", default="cc3m", choices=["cc3m", "full"])
    parser.add_argument("--no-compile", action="store_true", help="eager runs only")
    from training.loop import COMPILE_MODES  # torch and numpy only

    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=COMPILE_MODES,
        help="torch.compile mode of the compiled runs (train.compile's values)",
    )
    parser.add_argument("--no-eager", action="store_true", help="compiled runs only")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=170.0,
        help="seconds; compiled runs start only while the elapsed time is below it",
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for results.jsonl (default: $OUT)")
    args = parser.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "train_step.py: no CUDA device here; nothing to measure (use a GPU machine, or --device cpu "
            "for a smoke run)"
        )
        return 0
    _allow_missing_safetensors()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    start = time.perf_counter()
    batches = {m: args.batch or [DEFAULT_BATCH.get(m, 64)] for m in args.models}
    plan = ([] if args.no_eager else [(m, b, False) for m in args.models for b in batches[m]]) + (
        [] if args.no_compile else [(m, b, args.compile_mode) for m in args.models for b in batches[m]]
    )
    results = []
    for name, batch, compiled in plan:
        if compiled and time.perf_counter() - start > args.time_budget:
            print(
                f"{name} batch {batch} compiled: skipped, {time.perf_counter() - start:.0f} s spent of the "
                f"{args.time_budget:.0f} s budget"
            )
            continue
        try:
            r = run_one(
                name,
                batch,
                steps=args.steps,
                warmup=args.warmup,
                precision=args.precision,
                compile_model=compiled,
                captions=args.captions,
                device=device,
            )
        except torch.cuda.OutOfMemoryError:
            print(f"{name} batch {batch}: out of GPU memory; try --batch {batch // 2}")
            continue
        results.append(r)
        mfu_text = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(
            f"{name:9s} {compiled or 'eager':8s} batch {batch:5d}  {r['samples_per_s']:9.1f} samples/s  "
            f"{1000 * r['step_s']:7.1f} ms/step  {r['achieved_tflops']:6.1f} TFLOP/s  MFU {mfu_text}  "
            f"(text {r['text_tokens']} tokens, warmup {r['warmup_s']:.0f} s)",
            flush=True,
        )
        print("RESULT " + json.dumps(r), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with open(Path(args.out) / "train_step_results.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in results)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
