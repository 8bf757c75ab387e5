"""Run under the oracle interpreter (open_clip and clip_benchmark, nothing of clipray), by
`tests.support.oracle.run_oracle` and by `benchmarks/eval.py`:

    clip_benchmark_oracle.py --config CONFIG.json --model-dir DIR --seed S --out OUT_DIR
        [--workers 4] [--batch-size 64] [--amp] [--predictions] ROOT TASK [ROOT TASK ...]

With --config, makes an open_clip model from CONFIG (open_clip's model_cfg layout) with
torch.manual_seed(S) and saves it in open_clip's hub layout (open_clip_config.json +
open_clip_model.safetensors) in DIR; without it, DIR must hold one. Then runs `clip_benchmark eval
--model local-dir:DIR --dataset wds/<name> --dataset_root ROOT --task TASK` through its CLI entry
point for each (ROOT, TASK) pair, with its default loader (--num_workers 4, --batch_size 64) unless
told otherwise, and prints one JSON line: {"metrics": [...], "seconds": [...], "predictions": [...]}
(or {"skip": reason}). `seconds` is the wall time of each CLI run (model load, data, classifier,
images, metrics). --predictions adds each classification set's per-image predicted class, from
clip_benchmark's own zero_shot_classifier and run_classification.

Nothing of clip_benchmark is patched: its `accuracy` calls float() on a 1-element array, which
NumPy >= 2.4 refuses, so the oracle venv pins NumPy 2.3 (tests/oracles/requirements.txt); the wds
reading, transform, templates, classifier and metrics are all clip_benchmark's and open_clip's code.
"""

import argparse
import json
import sys
import time
from pathlib import Path


def make_model(config_file, model_dir, seed):
    import open_clip
    import torch
    from safetensors.torch import save_file

    cfg = json.loads(Path(config_file).read_text())
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.manual_seed(int(seed))
    model = open_clip.create_model(f"local-dir:{out}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))


def run_cli(model_dir, root, task, output, args):
    import clip_benchmark.cli

    sys.argv = [
        "clip_benchmark",
        "eval",
        "--model",
        f"local-dir:{model_dir}",
        "--dataset",
        "wds/oracle_set",
        "--dataset_root",
        root,
        "--task",
        task,
        "--output",
        output,
        "--num_workers",
        str(args.workers),
        "--batch_size",
        str(args.batch_size),
        "--recall_k",
        "1",
        "5",
    ]
    if not args.amp:
        sys.argv.append("--no_amp")
    start = time.perf_counter()
    clip_benchmark.cli.main()
    return time.perf_counter() - start, json.loads(Path(output).read_text())["metrics"]


def predictions(model_dir, root):
    """Per-image predicted class of a classification set, by clip_benchmark's own functions."""
    import open_clip
    import torch
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as zsc

    name = f"local-dir:{model_dir}"
    model, _, transform = open_clip.create_model_and_transforms(name)
    model.eval()
    ds = build_dataset("wds/oracle_set", root=root, transform=transform, split="test", download=False)
    loader = torch.utils.data.DataLoader(ds.batched(64), batch_size=None, num_workers=0)
    classifier = zsc.zero_shot_classifier(
        model, open_clip.get_tokenizer(name), ds.classes, ds.templates, "cpu", amp=False
    )
    logits, _ = zsc.run_classification(model, classifier, loader, "cpu", amp=False)
    return logits.argmax(dim=1).tolist()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--seed", default="0")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--predictions", action="store_true")
    p.add_argument("pairs", nargs="+")
    args = p.parse_args()
    if args.config:
        make_model(args.config, args.model_dir, args.seed)
    result = {"metrics": [], "seconds": [], "predictions": []}
    for i in range(0, len(args.pairs), 2):
        root, task = args.pairs[i], args.pairs[i + 1]
        seconds, metrics = run_cli(
            args.model_dir, root, task, str(Path(args.out) / f"clip_benchmark_{i // 2}.json"), args
        )
        result["seconds"].append(seconds)
        result["metrics"].append(metrics)
        wanted = args.predictions and task == "zeroshot_classification"
        result["predictions"].append(predictions(args.model_dir, root) if wanted else None)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
