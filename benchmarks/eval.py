"""Evaluation benchmark, side by side with the way CLIP_benchmark / open_clip do it.

1. Zero-shot: N images (JPEG bytes in a Parquet shard, like the pipeline's) against a
   classes x templates classifier (default 10,000 images, 1000 ImageNet classes x the 80 CLIP
   templates). Ours: `build_classifier` (prompts in batches), the local embedding engine (threaded
   decode) and `score_zeroshot`. Baseline, as CLIP_benchmark runs it: the classifier one class at a
   time (80 prompts per forward), images decoded one by one in the loop, logits = 100 x cosine,
   top-k. Prints prompts/s, images/s and the ratio; both must give the same accuracy.
2. Retrieval memory: P image-text pairs (default 20,000, D=512). Each method runs in its own
   process; peak RSS above the inputs is read from the kernel (VmHWM after a reset). Methods:
   `blocked` (ours), `dense` (our exact reference on the full N x N matrix) and
   `dense_clip_benchmark` (CLIP_benchmark's way: a dense float32 score matrix and torch.topk).
   `blocked` and `dense` must agree exactly.

    python benchmarks/eval.py                      # both parts, CPU, ViT-Tiny (64 px)
    python benchmarks/eval.py --model ViT-B-32 --images 2000 --device cuda
    python benchmarks/eval.py --skip-zeroshot --pairs 20000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# --- zero-shot ------------------------------------------------------------------------------------


def make_images(folder: Path, n: int, num_classes: int, seed: int = 0) -> Path:
    """A Parquet shard of n JPEGs (160x120, random colour blocks) with random labels."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    jpgs = []
    for _ in range(n):
        blocks = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
        arr = np.kron(blocks, np.ones((40, 40, 1), dtype=np.uint8))
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        jpgs.append(buf.getvalue())
    labels = rng.integers(0, num_classes, size=n)
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    table = pa.table({"key": [f"{i:06d}" for i in range(n)], "jpg": jpgs, "label": labels})
    pq.write_table(table, folder / "shards" / "part-0.parquet", row_group_size=1024)
    return folder


def zeroshot_ours(
    model, data: Path, classnames, templates, device: str, batch_size: int, engine: str, decode_threads: int
) -> dict:
    import evaluation.zeroshot as zs
    from evaluation.config import EvalConfig
    from evaluation.run import embed_dataset_images, _open

    zs._MEMORY_CACHE.clear()
    cfg = EvalConfig(
        dataset=str(data), batch_size=batch_size, engine=engine, decode_threads=decode_threads, use_gpu=device == "cuda"
    )
    ds = _open(str(data), cfg, need_labels=True)
    t0 = time.perf_counter()
    classifier = zs.build_classifier(model, classnames, templates, batch_size=batch_size, device=device)
    t1 = time.perf_counter()
    emb = embed_dataset_images(ds, model, cfg)
    t2 = time.perf_counter()
    labels = np.asarray(ds.meta.column("label").to_pylist())
    result = zs.score_zeroshot(emb["features"][emb["ok"]], labels[emb["ok"]], classifier.cpu(), classnames)
    t3 = time.perf_counter()
    return {
        "classifier_s": t1 - t0,
        "embed_s": t2 - t1,
        "score_s": t3 - t2,
        "total_s": t3 - t0,
        "metrics": result.metrics,
    }


def zeroshot_baseline(model, data: Path, classnames, templates, device: str, batch_size: int) -> dict:
    """CLIP_benchmark's procedure, re-implemented: per-class classifier, decode in the loop."""
    import pyarrow.parquet as pq
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from evaluation.embed import clip_preprocess
    from training.model import image_mean_std
    from training.tokenizer import tokenize

    mean, std = image_mean_std()
    model = model.to(device).eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        weights = []
        for name in classnames:
            tokens = tokenize([t.replace("{c}", name) for t in templates], context_length=model.context_length)
            emb = F.normalize(model.encode_text(tokens.to(device)), dim=-1).mean(dim=0)
            weights.append(emb / emb.norm())
        classifier = torch.stack(weights, dim=1)
    t1 = time.perf_counter()
    table = pq.read_table(data / "shards" / "part-0.parquet")
    jpgs, labels = table.column("jpg").to_pylist(), np.asarray(table.column("label").to_pylist())
    top1 = top5 = 0
    with torch.no_grad():
        for start in range(0, len(jpgs), batch_size):
            pixels = torch.from_numpy(
                np.stack(
                    [
                        clip_preprocess(Image.open(io.BytesIO(b)), model.image_size, mean, std)
                        for b in jpgs[start : start + batch_size]
                    ]
                )
            ).to(device)
            logits = 100.0 * F.normalize(model.encode_image(pixels), dim=-1) @ classifier
            target = torch.from_numpy(labels[start : start + batch_size]).to(device)
            pred = logits.topk(5, dim=1).indices
            top1 += int((pred[:, 0] == target).sum())
            top5 += int((pred == target[:, None]).any(dim=1).sum())
    t2 = time.perf_counter()
    return {
        "classifier_s": t1 - t0,
        "embed_s": t2 - t1,
        "score_s": 0.0,
        "total_s": t2 - t0,
        "metrics": {"acc1": top1 / len(jpgs), "acc5": top5 / len(jpgs)},
    }


def run_zeroshot(args) -> dict:
    import torch

    from evaluation.templates import load_classnames, load_templates
    from training.model import create_model

    torch.manual_seed(0)
    model = create_model(args.model).eval()
    classnames = load_classnames("imagenet")[: args.classes]
    templates = load_templates("imagenet")[: args.templates]
    prompts = len(classnames) * len(templates)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        data = make_images(Path(tmp), args.images, len(classnames))
        print(
            f"zero-shot: {args.images} JPEGs written in {time.perf_counter() - t:.1f}s; model {args.model} "
            f"({model.image_size} px), {len(classnames)} classes x {len(templates)} templates = {prompts} prompts, "
            f"device {args.device}, torch threads {torch.get_num_threads()}",
            flush=True,
        )
        rows = {}
        rows["ours (local engine)"] = zeroshot_ours(
            model, data, classnames, templates, args.device, args.batch_size, "local", args.decode_threads
        )
        if args.ray:
            import ray

            ray.init(
                num_cpus=os.cpu_count(),
                num_gpus=1 if args.device == "cuda" else 0,
                include_dashboard=False,
                log_to_driver=False,
            )
            rows["ours (Ray engine)"] = zeroshot_ours(
                model, data, classnames, templates, args.device, args.batch_size, "ray", args.decode_threads
            )
            ray.shutdown()
        rows["baseline (CLIP_benchmark way)"] = zeroshot_baseline(
            model, data, classnames, templates, args.device, args.batch_size
        )
    print(
        f"{'method':32s} {'classifier s':>12s} {'prompts/s':>10s} {'embed+score s':>13s} {'images/s':>9s} "
        f"{'end-to-end img/s':>16s}  acc1"
    )
    for name, r in rows.items():
        images_s = args.images / (r["embed_s"] + r["score_s"])
        print(
            f"{name:32s} {r['classifier_s']:12.1f} {prompts / r['classifier_s']:10.0f} "
            f"{r['embed_s'] + r['score_s']:13.1f} {images_s:9.1f} {args.images / r['total_s']:16.1f}  "
            f"{r['metrics']['acc1']:.4f}"
        )
    ours, base = rows["ours (local engine)"], rows["baseline (CLIP_benchmark way)"]
    print(
        f"ratio ours/baseline: end-to-end {base['total_s'] / ours['total_s']:.2f}x, classifier "
        f"{base['classifier_s'] / ours['classifier_s']:.2f}x, images "
        f"{(base['embed_s']) / (ours['embed_s'] + ours['score_s']):.2f}x"
    )
    same = abs(ours["metrics"]["acc1"] - base["metrics"]["acc1"]) < 1e-9
    print(f"same acc1 as the baseline: {same}")
    return rows


# --- retrieval memory -----------------------------------------------------------------------------


def _embeddings(pairs: int, dim: int, captions: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((pairs // captions, dim), dtype=np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    t2i = np.repeat(np.arange(len(images)), captions)
    texts = images[t2i] + 0.9 * rng.standard_normal((len(t2i), dim), dtype=np.float32) / np.sqrt(dim) * 8
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    return images, texts.astype(np.float32), t2i


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return -1


def retrieval_child(method: str, pairs: int, dim: int, captions: int, block: int, device: str) -> None:
    """Runs in its own process; prints one JSON line."""
    import torch

    from evaluation.retrieval import dense_retrieval_ranks, recall_from_ranks, retrieval_ranks

    images, texts, t2i = _embeddings(pairs, dim, captions)
    ks = (1, 5, 10)
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (VmHWM) to now
    before = _status("VmRSS")
    t0 = time.perf_counter()
    if method == "blocked":
        ranks = retrieval_ranks(images, texts, t2i, block_size=block, device=device)
        metrics = recall_from_ranks(*ranks, ks)
    elif method == "dense":
        ranks = dense_retrieval_ranks(images, texts, t2i)
        metrics = recall_from_ranks(*ranks, ks)
    else:  # CLIP_benchmark's way: one dense float32 matrix, torch.topk per row
        with torch.no_grad():
            img, txt, idx = torch.from_numpy(images), torch.from_numpy(texts), torch.from_numpy(t2i)
            s = txt @ img.T  # [texts, images]
            top_t = s.topk(max(ks), dim=1).indices
            top_i = s.T.topk(max(ks), dim=1).indices  # [images, k] text ids
            metrics = {}
            for k in ks:
                metrics[f"image_retrieval_recall@{k}"] = float((top_t[:, :k] == idx[:, None]).any(1).float().mean())
                metrics[f"text_retrieval_recall@{k}"] = float(
                    (idx[top_i[:, :k]] == torch.arange(len(img))[:, None]).any(1).float().mean()
                )
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    print(json.dumps({"method": method, "seconds": seconds, "peak_above_inputs": peak - before, "metrics": metrics}))


def run_retrieval_scale(args) -> None:
    """Blocked retrieval on `--scale-pairs` pairs on the GPU: time and peak GPU memory."""
    import torch

    from evaluation.retrieval import recall_from_ranks, retrieval_ranks

    n, dim = args.scale_pairs, args.dim
    g = torch.Generator(device="cuda").manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(n, dim, device="cuda", generator=g), dim=1)
    texts = torch.nn.functional.normalize(
        images + 0.9 * 8 / dim**0.5 * torch.randn(n, dim, device="cuda", generator=g), dim=1
    )
    t2i = np.arange(n)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    ranks = retrieval_ranks(images, texts, t2i, block_size=args.scale_block, device="cuda")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base
    m = recall_from_ranks(*ranks, (1, 5, 10))
    print(
        f"blocked retrieval on {n} pairs (GPU, block {args.scale_block}): {seconds:.1f}s, peak GPU memory above the "
        f"inputs {peak / 2**20:.0f} MiB (a dense float32 matrix would be {n * n * 4 / 2**30:.0f} GiB); "
        f"R@1 t->i {m['image_retrieval_recall@1']:.4f}, i->t {m['text_retrieval_recall@1']:.4f}"
    )


def run_retrieval(args) -> dict:
    n_img, dim = args.pairs // args.captions, args.dim
    dense_bytes = args.pairs * n_img * 4
    print(
        f"retrieval: {args.pairs} pairs ({n_img} images x {args.captions} captions), D={dim}, block {args.block}; "
        f"a dense float32 score matrix is {dense_bytes / 2**20:.0f} MiB",
        flush=True,
    )
    results = {}
    for method in args.methods:
        cmd = [
            sys.executable,
            __file__,
            "--retrieval-child",
            method,
            "--pairs",
            str(args.pairs),
            "--dim",
            str(dim),
            "--captions",
            str(args.captions),
            "--block",
            str(args.block),
            "--device",
            args.device,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(out.stderr[-3000:])
            raise SystemExit(f"{method} failed")
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'method':22s} {'seconds':>8s} {'peak MiB above inputs':>22s}  R@1 t->i  R@1 i->t  R@10 t->i")
    for name, r in results.items():
        m = r["metrics"]
        print(
            f"{name:22s} {r['seconds']:8.1f} {r['peak_above_inputs'] / 2**20:22.0f}  "
            f"{m['image_retrieval_recall@1']:.4f}    {m['text_retrieval_recall@1']:.4f}    "
            f"{m['image_retrieval_recall@10']:.4f}"
        )
    if "blocked" in results and "dense" in results:
        same = results["blocked"]["metrics"] == results["dense"]["metrics"]
        print(f"blocked == dense (exact, every k): {same}")
        if not same:
            raise SystemExit("blocked and dense recalls differ")
    base = results.get("dense_clip_benchmark") or results.get("dense")
    if "blocked" in results and base:
        print(
            f"memory ratio dense/blocked: {base['peak_above_inputs'] / max(results['blocked']['peak_above_inputs'], 1):.1f}x"
        )
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--templates", type=int, default=80)
    p.add_argument("--model", default="ViT-Tiny")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--decode-threads", type=int, default=4)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--ray", action="store_true", help="also time the Ray engine (local cluster)")
    p.add_argument("--pairs", type=int, default=20_000)
    p.add_argument("--captions", type=int, default=1, help="captions per image")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--block", type=int, default=2048)
    p.add_argument("--methods", nargs="+", default=["blocked", "dense", "dense_clip_benchmark"])
    p.add_argument(
        "--scale-pairs", type=int, default=0, help="also run blocked retrieval on this many pairs on the GPU"
    )
    p.add_argument("--scale-block", type=int, default=8192)
    p.add_argument("--skip-zeroshot", action="store_true")
    p.add_argument("--skip-retrieval", action="store_true")
    p.add_argument("--retrieval-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.retrieval_child:
        retrieval_child(args.retrieval_child, args.pairs, args.dim, args.captions, args.block, args.device)
        return
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')} on {platform.node()}: {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}"
    )
    if not args.skip_zeroshot:
        run_zeroshot(args)
    if not args.skip_retrieval:
        run_retrieval(args)
    if args.scale_pairs:
        run_retrieval_scale(args)


if __name__ == "__main__":
    main()
