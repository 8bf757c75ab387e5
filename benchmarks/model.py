"""Training-step throughput of clipray's CLIP vs open_clip's, same weights, same inputs, CPU float32.

One step = forward of a batch (images + tokenized captions), CLIP's symmetric InfoNCE loss,
backward, AdamW step. Both models get the same weights (open_clip's state dict loaded into ours
with strict=True) and the script checks that the first losses agree before timing anything.
Steps of the two implementations are interleaved round by round (the machine may be shared);
the median round gives samples/s.

open_clip is not a dependency of clipray (it pulls torchvision and a CUDA torch), so run this from
a separate venv that has open_clip and clipray's requirements, with the project on PYTHONPATH:

    python3 -m venv /tmp/ocvenv
    /tmp/ocvenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/ocvenv/bin/pip install --no-deps open_clip_torch==3.3.0
    /tmp/ocvenv/bin/pip install --no-deps regex ftfy wcwidth tqdm huggingface-hub safetensors timm tokenizers numpy
    PYTHONPATH=. /tmp/ocvenv/bin/python benchmarks/model.py [--models ViT-B-32 RN50] [--batch 16]

Without open_clip it times clipray alone and says so. `--device cuda --precision bf16 --batch 256`
times the same step on a GPU under bf16 autocast (`--compile` compiles both models).
`--threads 1 --cpu-clock` measures samples per CPU-second of one thread: on a machine shared with
other jobs, wall-clock rounds swing by 2x, while CPU time measures the work each step does.

--captions real (default): synthetic CC3M-like captions (benchmarks/tokenizer.py), 6-25 tokens;
--captions full: every row uses all 77 positions (no end-of-text before the last slot), which
takes away the text tower's trimming and shows the gain of the other changes alone.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tokenizer import make_captions  # noqa: E402  (benchmarks/tokenizer.py)

from training.model import create_model  # noqa: E402
from training.tokenizer import tokenize  # noqa: E402


def clip_loss(image_features, text_features, logit_scale):
    logits = logit_scale * image_features @ text_features.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def make_step(model, precision: str = "fp32", device: str = "cpu"):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.2}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-5,
        betas=(0.9, 0.98),
        eps=1e-6,
    )

    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(images, tokens) -> float:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = clip_loss(*model(images, tokens))
        loss.backward()
        opt.step()
        return loss.item()

    return step


def inputs(batch: int, image_size: int, captions: str, device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=g)
    if captions == "full":
        tokens = torch.randint(1, 49406, (batch, 77), generator=g)
        tokens[:, 0], tokens[:, -1] = 49406, 49407
    else:
        tokens = tokenize(make_captions(batch, seed=1))
    return images.to(device), tokens.to(device)


def bench(
    name: str,
    batch: int,
    rounds: int,
    steps: int,
    captions: str,
    device: str = "cpu",
    precision: str = "fp32",
    compile: bool = False,
    cpu_clock: bool = False,
) -> None:
    torch.manual_seed(0)
    ours = create_model(name).train()
    try:
        import open_clip

        theirs = open_clip.create_model(name, pretrained=None).train()
        ours.load_state_dict(theirs.state_dict(), strict=True)
        theirs.to(device)
    except ImportError as e:
        theirs = None
        print(f"open_clip not importable ({e}): timing clipray alone")
    ours.to(device)
    images, tokens = inputs(batch, ours.image_size, captions, device)
    lengths = (tokens.argmax(-1) + 1).float()
    print(
        f"\n{name}: batch {batch}, images {tuple(images.shape[1:])}, tokens to end-of-text: "
        f"mean {lengths.mean():.1f}, max {int(lengths.max())}"
    )
    wrap = (lambda m: torch.compile(m)) if compile else (lambda m: m)
    steps_fn = {"clipray": make_step(wrap(ours), precision, device)}
    if theirs is not None:
        steps_fn["open_clip"] = make_step(wrap(theirs), precision, device)
    first = {k: fn(images, tokens) for k, fn in steps_fn.items()}  # warm-up step, and a numerics check
    print("first-step loss: " + ", ".join(f"{k} {v:.6f}" for k, v in first.items()))
    if theirs is not None and abs(first["clipray"] - first["open_clip"]) > (1e-3 if precision == "fp32" else 5e-2):
        sys.exit(f"losses differ ({first}): not the same computation")
    times: dict[str, list[float]] = {k: [] for k in steps_fn}
    clock = time.process_time if cpu_clock else time.perf_counter
    for r in range(rounds):
        order = list(steps_fn) if r % 2 == 0 else list(reversed(steps_fn))
        for k in order:
            t = clock()
            for _ in range(steps):
                steps_fn[k](images, tokens)
            times[k].append(batch * steps / (clock() - t))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in times.items()))
    med = {k: statistics.median(v) for k, v in times.items()}
    unit = "samples per CPU-second" if cpu_clock else "samples/s"
    line = f"{name} ({captions} captions, {device} {precision}{' compiled' if compile else ''}, {unit}): clipray {med['clipray']:.2f}"
    if theirs is not None:
        # Paired per-round ratios are less sensitive to load that changes from round to round.
        paired = statistics.median(a / b for a, b in zip(times["clipray"], times["open_clip"]))
        # The best round of each is the one least slowed by other jobs: closest to an idle machine.
        best = {k: max(v) for k, v in times.items()}
        line += (
            f", open_clip {med['open_clip']:.2f}, ratio of medians "
            f"{med['clipray'] / med['open_clip']:.2f}x, median of per-round ratios {paired:.2f}x; "
            f"best rounds: clipray {best['clipray']:.2f}, open_clip {best['open_clip']:.2f}, "
            f"ratio {best['clipray'] / best['open_clip']:.2f}x"
        )
    print(line)
    del ours, theirs, steps_fn
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "RN50"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="steps per round and implementation")
    parser.add_argument("--captions", choices=["real", "full"], default="real")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument(
        "--cpu-clock",
        action="store_true",
        help="time with the process's CPU time instead of wall-clock time: on a shared "
        "machine this measures the work done, not the waiting (use with --threads 1)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
        f"python {platform.python_version()}, load average {_load()}"
    )
    for name in args.models:
        bench(
            name,
            args.batch,
            args.rounds,
            args.steps,
            args.captions,
            args.device,
            args.precision,
            args.compile,
            args.cpu_clock,
        )
        print(f"load average after {name}: {_load()}")


def _load() -> str:
    """1/5/15-minute load average: wall-clock numbers mean little on a machine busy with other jobs."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"


if __name__ == "__main__":
    main()
