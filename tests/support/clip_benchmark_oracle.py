"""Run under the oracle interpreter by `tests.support.oracle.run_oracle` (open_clip and
clip_benchmark, nothing of clipray):

    clip_benchmark_oracle.py CONFIG.json MODEL_DIR SEED OUT_DIR [DATASET_ROOT TASK]...

makes an open_clip model from CONFIG (open_clip's model_cfg layout) with torch.manual_seed(SEED),
saves it in open_clip's hub layout (open_clip_config.json + open_clip_model.safetensors), then runs
`clip_benchmark eval --model local-dir:MODEL_DIR --dataset wds/<name> --dataset_root ROOT --task
TASK --no_amp` for each (ROOT, TASK) pair through its CLI entry point, and prints the metrics it
wrote as one JSON line: {"metrics": [per pair]} (or {"skip": reason}).

One patch, and why: clip_benchmark 1.6.2's `accuracy` calls float() on a 1-element array, which
NumPy >= 2.4 refuses; it is replaced by the same sum taken as a 0-d tensor. Everything else
(wds reading, transform, templates, classifier, retrieval) is clip_benchmark's and open_clip's code.
"""

import json
import sys
from pathlib import Path


def main(config_file, model_dir, seed, out_dir, *pairs):
    try:
        import requests  # noqa: F401  (clip_benchmark's datasets/imagenetv2.py imports it, undeclared)
    except ImportError:
        print(
            json.dumps(
                {
                    "skip": "clip_benchmark 1.6.2 imports `requests` (datasets/imagenetv2.py) without "
                    "declaring it, and the oracle venv lacks it: add requests to tests/oracles/requirements.txt"
                }
            )
        )
        return
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

    import clip_benchmark.cli
    from clip_benchmark.metrics import zeroshot_classification as zsc

    def accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        n = len(target)
        return [float(correct[:k].reshape(-1).float().sum()) / n for k in topk]

    zsc.accuracy = accuracy
    results = []
    for i in range(0, len(pairs), 2):
        root, task = pairs[i], pairs[i + 1]
        output = str(Path(out_dir) / f"clip_benchmark_{i // 2}.json")
        sys.argv = [
            "clip_benchmark",
            "eval",
            "--model",
            f"local-dir:{out}",
            "--dataset",
            "wds/oracle_set",
            "--dataset_root",
            root,
            "--task",
            task,
            "--output",
            output,
            "--no_amp",
            "--num_workers",
            "0",
            "--recall_k",
            "1",
            "5",
        ]
        clip_benchmark.cli.main()
        results.append(json.loads(Path(output).read_text())["metrics"])
    print(json.dumps({"metrics": results, "predictions": predictions(out, pairs)}))


def predictions(model_dir, pairs):
    """Per-image predicted class of each classification set, by clip_benchmark's own functions."""
    import open_clip
    import torch
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as zsc

    name = f"local-dir:{model_dir}"
    model, _, transform = open_clip.create_model_and_transforms(name)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    out = []
    for i in range(0, len(pairs), 2):
        if pairs[i + 1] != "zeroshot_classification":
            out.append(None)
            continue
        ds = build_dataset("wds/oracle_set", root=pairs[i], transform=transform, split="test", download=False)
        loader = torch.utils.data.DataLoader(ds.batched(64), batch_size=None, num_workers=0)
        classifier = zsc.zero_shot_classifier(model, tokenizer, ds.classes, ds.templates, "cpu", amp=False)
        logits, _ = zsc.run_classification(model, classifier, loader, "cpu", amp=False)
        out.append(logits.argmax(dim=1).tolist())
    return out


if __name__ == "__main__":
    main(*sys.argv[1:])
