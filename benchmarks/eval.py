"""Evaluation benchmark, side by side with CLIP_benchmark itself.

1. Zero-shot: N images (JPEG, random labels) in a CLIP_benchmark `wds` set (test/*.tar, classnames.txt,
   zeroshot_classification_templates.txt) against a classes x templates classifier (default 10,000
   images, 1000 ImageNet classes x the 80 CLIP templates), one model for every row. Rows:
   - ours: `clipray eval`'s functions (model load, open the set, `build_classifier`, the local
     embedding engine with threaded decode, `score_zeroshot`);
   - **clip-benchmark**: the `clip-benchmark` package's own CLI (`clip_benchmark eval --dataset
     wds/... --model local-dir:...`, its default loader: 4 workers, batch 64) in the oracle venv
     (`--oracle-python`, default $CLIPRAY_ORACLE_PYTHON): the model is made there by open_clip,
     saved in its hub layout, and the same weights are loaded into ours;
   - re-implementation (a second, labelled row): CLIP_benchmark's procedure re-written in this
     process (classifier one class at a time, images decoded one by one in the loop, 100 x cosine,
     top-k), for when the oracle venv is absent.
   Prints seconds, images/s and the ratio clip-benchmark / ours; every row must give the same acc1.
2. Retrieval memory: P image-text pairs (default 20,000, D=512). Each method runs in its own
   process; peak RSS above the inputs is read from the kernel (VmHWM after a reset). Methods:
   `blocked` (ours), `dense` (our exact reference on the full N x N matrix) and
   `dense_clip_benchmark` (CLIP_benchmark's way: a dense float32 score matrix and torch.topk).
   `blocked` and `dense` must agree exactly.

    python benchmarks/eval.py                      # both parts, CPU, ViT-Tiny (64 px)
    python benchmarks/eval.py --model ViT-B-32 --images 2000 --device cuda
    python benchmarks/eval.py --skip-retrieval --images 500 --classes 100 --templates 8   # a quick check
    python benchmarks/eval.py --skip-zeroshot --pairs 20000

Over 400 lines on purpose: every row of the comparison (ours, the clip-benchmark CLI, the
re-implementation) and the retrieval part share one data set, one model and one report, and are
meant to be read side by side in one file.
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
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# --- zero-shot ------------------------------------------------------------------------------------


ORACLE_SCRIPT = ROOT / "tests" / "support" / "clip_benchmark_oracle.py"
SHARD_SIZE = 1024


def make_wds_set(
    folder: Path, n: int, classnames: list[str], templates: list[str], min_shards: int = 1, seed: int = 0
) -> Path:
    """A CLIP_benchmark wds set of n JPEGs (160x120, random colour blocks) with random labels, in
    shards of up to SHARD_SIZE and at least min_shards (webdataset gives each loader worker whole
    shards and fails on a worker with none)."""
    import tarfile

    from PIL import Image

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(classnames), size=n)
    (folder / "test").mkdir(parents=True, exist_ok=True)
    shards = max(min_shards, (n + SHARD_SIZE - 1) // SHARD_SIZE)
    per_shard = (n + shards - 1) // shards
    for s in range(shards):
        with tarfile.open(folder / "test" / f"{s}.tar", "w") as tar:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                blocks = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(np.kron(blocks, np.ones((40, 40, 1), dtype=np.uint8))).save(buf, "JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("cls", str(int(labels[i])).encode())):
                    info = tarfile.TarInfo(f"{i:07d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (folder / "test" / "nshards.txt").write_text(f"{shards}\n")
    (folder / "classnames.txt").write_text("".join(f"{c}\n" for c in classnames))
    (folder / "zeroshot_classification_templates.txt").write_text("".join(f"{t}\n" for t in templates))
    return folder


def zeroshot_ours(
    model_files: tuple[str, dict],
    data: Path,
    device: str,
    batch_size: int,
    engine: str,
    decode_threads: int,
    precision: str,
) -> dict:
    import evaluation.zeroshot as zs
    from evaluation.config import EvalConfig
    from evaluation.run import embed_dataset_images, open_eval_dataset
    from training.model import load_model

    zs._MEMORY_CACHE.clear()
    cfg = EvalConfig(
        dataset=str(data),
        batch_size=batch_size,
        engine=engine,
        decode_threads=decode_threads,
        use_gpu=device == "cuda",
        precision=precision,
    )
    t0 = time.perf_counter()
    model = load_model(model_files[0], name=model_files[1]).to(device)
    ds = open_eval_dataset(str(data), cfg, need_labels=True)
    t1 = time.perf_counter()
    classifier = zs.build_classifier(model, ds.classnames, ds.templates, batch_size=batch_size, device=device)
    t2 = time.perf_counter()
    emb = embed_dataset_images(ds, model, cfg)
    t3 = time.perf_counter()
    labels = ds.meta.column("label").to_numpy()
    result = zs.score_zeroshot(emb["features"][emb["ok"]], labels[emb["ok"]], classifier.cpu(), ds.classnames)
    t4 = time.perf_counter()
    return {
        "load_s": t1 - t0,
        "classifier_s": t2 - t1,
        "embed_s": t3 - t2,
        "score_s": t4 - t3,
        "total_s": t4 - t0,
        "metrics": result.metrics,
    }


def zeroshot_reimplementation(model_files: tuple[str, dict], data: Path, device: str, batch_size: int) -> dict:
    """CLIP_benchmark's procedure, re-implemented in this process: per-class classifier, decode in the loop."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from evaluation.embed import clip_preprocess
    from evaluation.wds import iter_samples
    from training.model import image_mean_std, load_model
    from training.tokenizer import tokenize

    mean, std = image_mean_std()
    t0 = time.perf_counter()
    model = load_model(model_files[0], name=model_files[1]).to(device).eval()
    classnames = (data / "classnames.txt").read_text().splitlines()
    templates = (data / "zeroshot_classification_templates.txt").read_text().splitlines()
    with torch.no_grad():
        weights = []
        for name in classnames:
            tokens = tokenize([t.replace("{c}", name) for t in templates], context_length=model.context_length)
            emb = F.normalize(model.encode_text(tokens.to(device)), dim=-1).mean(dim=0)
            weights.append(emb / emb.norm())
        classifier = torch.stack(weights, dim=1)
    t1 = time.perf_counter()
    samples = []
    for shard in sorted((data / "test").glob("*.tar"), key=lambda p: int(p.stem)):
        with open(shard, "rb") as fh:
            samples.extend((s["jpg"], int(s["cls"])) for _, s in iter_samples(fh))
    top1 = top5 = 0
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            pixels = torch.from_numpy(
                np.stack([clip_preprocess(Image.open(io.BytesIO(b)), model.image_size, mean, std) for b, _ in batch])
            ).to(device)
            logits = 100.0 * F.normalize(model.encode_image(pixels), dim=-1) @ classifier
            target = torch.tensor([label for _, label in batch], device=device)
            pred = logits.topk(min(5, len(classnames)), dim=1).indices
            top1 += int((pred[:, 0] == target).sum())
            top5 += int((pred == target[:, None]).any(dim=1).sum())
    t2 = time.perf_counter()
    return {
        "load_s": 0.0,
        "classifier_s": t1 - t0,
        "embed_s": t2 - t1,
        "score_s": 0.0,
        "total_s": t2 - t0,
        "metrics": {"acc1": top1 / len(samples), "acc5": top5 / len(samples)},
    }


def oracle_python(args) -> tuple[Optional[str], str]:
    """(the oracle venv's interpreter, "") or (None, why not)."""
    path = args.oracle_python or os.environ.get("CLIPRAY_ORACLE_PYTHON")
    if not path:
        return None, "no oracle venv: pass --oracle-python or set CLIPRAY_ORACLE_PYTHON (make oracles builds one)"
    if not Path(path).is_file():
        return None, f"oracle interpreter {path} does not exist"
    return path, ""


def run_clip_benchmark(python: str, args, model_dir: Path, data: Path, out: Path, config_file: Optional[Path]) -> dict:
    """clip_benchmark's CLI on the set (and, with config_file, the open_clip model made first)."""
    cmd = [python, str(ORACLE_SCRIPT), "--model-dir", str(model_dir), "--out", str(out), "--workers", str(args.workers)]
    if config_file is not None:
        cmd += ["--config", str(config_file), "--seed", "0"]
    if args.amp:
        cmd.append("--amp")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([*cmd, str(data), "zeroshot_classification"], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"clip_benchmark failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_zeroshot(args) -> dict:
    import torch

    from evaluation.templates import load_classnames, load_templates
    from training.model import create_model, get_model_config, save_model

    classnames = load_classnames("imagenet")[: args.classes]
    templates = load_templates("imagenet")[: args.templates]
    prompts = len(classnames) * len(templates)
    precision = ("amp_fp16" if args.device == "cuda" else "amp_bf16") if args.amp else "fp32"
    python, why_not = oracle_python(args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        data = make_wds_set(tmp / "wds_bench", args.images, classnames, templates, min_shards=args.workers)
        config = get_model_config(args.model)
        (tmp / "model_config.json").write_text(json.dumps(config))
        print(
            f"zero-shot: {args.images} JPEGs written as a wds set in {time.perf_counter() - t:.1f}s; model "
            f"{args.model} ({config['vision_cfg']['image_size']} px), {len(classnames)} classes x {len(templates)} "
            f"templates = {prompts} prompts, device {args.device}, {precision}, torch threads {torch.get_num_threads()}",
            flush=True,
        )
        rows, theirs = {}, None
        if python:
            theirs = run_clip_benchmark(python, args, tmp / "model", data, tmp, tmp / "model_config.json")
            if "skip" in theirs:
                why_not, theirs = theirs["skip"], None
        if theirs is not None:
            model_files = (str(tmp / "model" / "open_clip_model.safetensors"), config)
        else:  # no oracle: the same random model for our rows only
            torch.manual_seed(0)
            save_model(create_model(config), tmp / "ours")
            model_files = (str(tmp / "ours" / "model.safetensors"), config)
            print(f"clip-benchmark row skipped: {why_not}")
        rows["ours (local engine)"] = zeroshot_ours(
            model_files, data, args.device, args.batch_size, "local", args.decode_threads, precision
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
                model_files, data, args.device, args.batch_size, "ray", args.decode_threads, precision
            )
            ray.shutdown()
        if theirs is not None:
            rows[f"clip-benchmark CLI ({args.workers} workers)"] = {
                "total_s": theirs["seconds"][0],
                "metrics": theirs["metrics"][0],
            }
        if not args.skip_reimplementation:
            rows["re-implementation (CLIP_benchmark way, 1 process)"] = zeroshot_reimplementation(
                model_files, data, args.device, args.batch_size
            )
    print(f"{'method':50s} {'total s':>8s} {'images/s':>9s} {'classifier s':>12s} {'embed+score s':>13s}  acc1")
    for name, r in rows.items():
        detail = (
            f"{r['classifier_s']:12.1f} {r['embed_s'] + r['score_s']:13.1f}"
            if "classifier_s" in r
            else f"{'-':>12s} {'-':>13s}"
        )
        print(f"{name:50s} {r['total_s']:8.1f} {args.images / r['total_s']:9.1f} {detail}  {r['metrics']['acc1']:.4f}")
    ours = rows["ours (local engine)"]
    for name, r in rows.items():
        if name.startswith(("clip-benchmark", "re-implementation")):
            print(f"ratio {name} / ours (end to end, model load included): {r['total_s'] / ours['total_s']:.2f}x")
    accs = {name: r["metrics"]["acc1"] for name, r in rows.items()}
    same = max(accs.values()) - min(accs.values()) < 1e-9
    print(f"same acc1 in every row: {same}")
    if not same:
        raise SystemExit(f"acc1 differs between rows: {accs}")
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
    p.add_argument("--oracle-python", help="the venv with clip-benchmark (default: $CLIPRAY_ORACLE_PYTHON)")
    p.add_argument("--workers", type=int, default=4, help="clip_benchmark's --num_workers (its default: 4)")
    p.add_argument(
        "--amp", action="store_true", help="clip_benchmark's default autocast; ours amp_bf16 (CPU) / amp_fp16"
    )
    p.add_argument("--skip-reimplementation", action="store_true")
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
