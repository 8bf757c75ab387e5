"""`clipray eval`: load the model, open the data set, embed (plain loop or Ray Data actors), score,
write CLIP_benchmark's JSON, the Markdown summary, the confusion matrix and the predictions.

`run_evaluation(cfg) -> dict` is the runner the CLI calls; `evaluate_dataset(model, cfg)` is the
same without loading the model or writing files, for callers that hold a model (the demo, a
training run's validation).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import numpy as np
import torch

from evaluation.config import EvalConfig
from evaluation.datasets import EvalDataset, open_dataset, resolve_classes
from evaluation.embed import ImageEmbedder, TextEmbedder, embed_local, embed_ray, iter_slices, normalize
from evaluation.linear_probe import linear_probe
from evaluation.classification import confusion_matrix, topk_classes, target_ranks
from evaluation.outputs import print_summary, write_outputs
from evaluation.results import EvalResult, skipped_summary
from evaluation.retrieval import blocked_topk, recall_from_ranks, retrieval_ranks
from evaluation.templates import check_templates, load_classnames, load_templates
from evaluation.zeroshot import build_classifier, score_zeroshot

log = logging.getLogger(__name__)


# --- embedding: one choice of engine, one per-batch class -----------------------------------------


def choose_engine(cfg: EvalConfig, num_rows: int) -> str:
    if cfg.engine != "auto":
        return cfg.engine
    import ray

    return "ray" if ray.is_initialized() and num_rows >= cfg.ray_min_rows else "local"


def _device(cfg: EvalConfig) -> str:
    """Where this process embeds (the local engine): eval.use_gpu needs a CUDA device here."""
    if cfg.use_gpu and not torch.cuda.is_available():
        raise ValueError(
            "eval.use_gpu is set but this machine has no CUDA device "
            "(with engine ray, the GPUs of the cluster's workers are used instead)"
        )
    return "cuda" if cfg.use_gpu else "cpu"


def _driver_device(cfg: EvalConfig) -> str:
    """Where this process scores (retrieval tiles): the GPU when asked for and present here."""
    return "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"


def embed_dataset_images(ds: EvalDataset, model: torch.nn.Module, cfg: EvalConfig) -> dict[str, np.ndarray]:
    """{"features" [n, D] (meta row order), "ok" [n], "error" [n]} for the rows of `ds.meta`."""
    engine = choose_engine(cfg, ds.num_rows)
    kwargs = dict(precision=cfg.precision, decode_threads=cfg.decode_threads, storage=ds.storage)
    start = time.perf_counter()
    if engine == "ray":
        out = embed_ray(
            ds.to_ray(),
            ImageEmbedder,
            dict(kwargs, model=model),
            batch_size=cfg.batch_size,
            use_gpu=cfg.use_gpu,
            num_actors=cfg.num_actors,
            cpus_per_actor=cfg.cpus_per_actor,
        )
    else:
        embedder = ImageEmbedder(model, device=_device(cfg), **kwargs)
        out = embed_local(embedder, ds.iter_image_batches(cfg.batch_size))
    seconds = time.perf_counter() - start
    log.info("embedded %d images with the %s engine in %.1fs", ds.num_rows, engine, seconds)
    return align_embeddings(out, ds, engine, seconds)


def align_embeddings(out: dict[str, np.ndarray], ds: EvalDataset, engine: str, seconds: float) -> dict[str, Any]:
    """The embedder's output rows picked in `ds.meta` order by row_id (row groups and tar shards
    may hold rows that were dropped at open time)."""
    want = ds.meta.column("row_id").to_numpy()
    order = np.argsort(out["row_id"], kind="stable")
    pos = np.searchsorted(out["row_id"][order], want)
    if np.any(pos >= len(order)) or np.any(out["row_id"][order][np.minimum(pos, len(order) - 1)] != want):
        raise RuntimeError("embedding lost rows: the embedded row ids do not cover the data set (a bug)")
    take = order[pos]
    return {
        "features": out["image_features"][take],
        "ok": out["ok"][take].astype(bool),
        "error": out["error"][take],
        "engine": engine,
        "seconds": seconds,
    }


def embed_texts(texts: list[str], model: torch.nn.Module, cfg: EvalConfig) -> np.ndarray:
    """[n, D] projected text features, in order."""
    if not texts:
        return np.zeros((0, int(model.config["embed_dim"])), dtype=np.float32)
    if choose_engine(cfg, len(texts)) == "ray":
        import ray

        from ray_compat import data_context

        data_context()
        rows = np.arange(len(texts))
        ds = ray.data.from_items(
            [{"row_id": int(i), "text": t} for i, t in zip(rows, texts)],
            override_num_blocks=max(1, min(64, len(texts) // max(cfg.batch_size, 1))),
        )
        out = embed_ray(
            ds,
            TextEmbedder,
            {"model": model, "precision": cfg.precision},
            batch_size=cfg.batch_size,
            use_gpu=cfg.use_gpu,
            num_actors=cfg.num_actors,
            cpus_per_actor=cfg.cpus_per_actor,
        )
        return out["text_features"][np.argsort(out["row_id"], kind="stable")]
    embedder = TextEmbedder(model, device=_device(cfg), precision=cfg.precision)
    return embed_local(embedder, iter_slices({"text": texts}, cfg.batch_size))["text_features"]


def _skipped(ds: EvalDataset, emb: dict[str, np.ndarray]) -> dict[str, Any]:
    bad = ~emb["ok"]
    keys = ds.meta.column("key").to_numpy(zero_copy_only=False)[bad]
    summary = skipped_summary([str(k) for k in keys], [str(e) for e in emb["error"][bad]])
    for reason, count in ds.rejected.items():
        summary["count"] += count
        summary["reasons"][reason] = summary["reasons"].get(reason, 0) + count
    return summary


def _own_name(ds: EvalDataset) -> Optional[str]:
    """The name a set carries itself (a wds set: CLIP_benchmark's name, e.g. `vtab/cifar100`);
    other sets are named after their path by the runner."""
    return ds.name if ds.format == "wds" else None


def open_eval_dataset(
    spec: str, cfg: EvalConfig, *, need_labels=False, need_captions=False, what="eval.dataset"
) -> EvalDataset:
    ds = open_dataset(
        spec,
        image_col=cfg.image_col,
        label_col=cfg.label_col,
        caption_col=cfg.caption_col,
        need_labels=need_labels,
        need_captions=need_captions,
        name=cfg.dataset_name if what == "eval.dataset" else None,
        storage=cfg,
        what=what,
        image_root=cfg.image_root,
        allow_external_image_paths=cfg.allow_external_image_paths,
    )
    if cfg.max_samples:
        ds = ds.head(cfg.max_samples)
    return ds


# --- the three tasks ------------------------------------------------------------------------------


def evaluate_zeroshot_dataset(
    model: torch.nn.Module, cfg: EvalConfig, ds: Optional[EvalDataset] = None, emb: Optional[dict] = None
) -> EvalResult:
    """emb: the set's image embeddings when already computed (a suite embeds all its sets at once)."""
    ds = ds or open_eval_dataset(cfg.dataset, cfg, need_labels=True)
    if cfg.classnames:
        classnames_file = load_classnames(cfg.classnames, cfg.dataset_name, cfg)
    else:
        classnames_file = ds.classnames  # a wds set's classnames.txt, when it has one
    classnames, labels, names_from = resolve_classes(
        ds.meta.column("label").to_pylist(), folder_classes=ds.classes, classnames=classnames_file, need_names=True
    )
    if classnames_file is not None and not cfg.classnames:
        names_from = f"the data set's {ds.format} class names"
    if cfg.templates is None and ds.templates:
        check_templates(ds.templates, source=f"{ds.source} templates")
        templates = list(ds.templates)
    else:
        templates = load_templates(cfg.templates, cfg.dataset_name, cfg)
    emb = emb or embed_dataset_images(ds, model, cfg)
    on_ray = choose_engine(cfg, len(classnames) * len(templates)) == "ray"
    encode = (lambda prompts: embed_texts(prompts, model, cfg)) if on_ray else None
    classifier = build_classifier(
        model,
        classnames,
        templates,
        batch_size=cfg.batch_size,
        device=_driver_device(cfg) if on_ray else _device(cfg),
        cache_dir=cfg.classifier_cache,
        storage=cfg,
        encode_texts=encode,
    )
    ok = emb["ok"]
    if not ok.any():
        raise ValueError(f"none of the {ds.num_rows} images of {ds.source} could be decoded (e.g. {emb['error'][0]})")
    keys = ds.meta.column("key").to_numpy(zero_copy_only=False)
    result = score_zeroshot(
        emb["features"][ok],
        labels[ok],
        classifier,
        classnames,
        keys=keys[ok],
        skipped=_skipped(ds, emb),
        details={
            "num_templates": len(templates),
            "classnames_from": names_from,
            "engine": emb["engine"],
            "embed_seconds": round(emb["seconds"], 3),
        },
        predictions=cfg.dump_predictions,
    )
    result.dataset_name = _own_name(ds)
    return result


def evaluate_retrieval_dataset(
    model: torch.nn.Module, cfg: EvalConfig, ds: Optional[EvalDataset] = None, emb: Optional[dict] = None
) -> EvalResult:
    ds = ds or open_eval_dataset(cfg.dataset, cfg, need_captions=True)
    emb = emb or embed_dataset_images(ds, model, cfg)
    ok = emb["ok"]
    if not ok.any():
        raise ValueError(f"none of the {ds.num_rows} images of {ds.source} could be decoded (e.g. {emb['error'][0]})")
    captions = [c for c, good in zip(ds.meta.column("captions").to_pylist(), ok) if good]
    image_keys = ds.meta.column("key").to_numpy(zero_copy_only=False)[ok].astype(str)
    texts = [t for caps in captions for t in caps]
    text_to_image = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
    text_features = embed_texts(texts, model, cfg)
    images = normalize(emb["features"][ok])
    text = normalize(text_features)
    device = _driver_device(cfg)
    text_ranks, image_ranks = retrieval_ranks(
        images, text, text_to_image, block_size=cfg.retrieval_block_size, device=device
    )
    metrics = recall_from_ranks(text_ranks, image_ranks, cfg.recall_k)
    skipped = _skipped(ds, emb)
    skipped["captions_dropped_with_their_image"] = int(
        sum(len(c) for c, good in zip(ds.meta.column("captions").to_pylist(), ok) if not good)
    )
    result = EvalResult(
        task="retrieval",
        metrics=metrics,
        num_samples=int(ok.sum()),
        skipped=skipped,
        dataset_name=_own_name(ds),
        details={
            "num_images": int(ok.sum()),
            "num_texts": len(texts),
            "engine": emb["engine"],
            "embed_seconds": round(emb["seconds"], 3),
        },
    )
    if cfg.dump_predictions:
        k = max(cfg.recall_k)
        caption_ids = np.asarray(
            [f"{image_keys[i]}#{j}" for i, caps in enumerate(captions) for j in range(len(caps))], dtype=object
        )
        t_top, _ = blocked_topk(text, images, k, block_size=cfg.retrieval_block_size, device=device)
        i_top, _ = blocked_topk(images, text, k, block_size=cfg.retrieval_block_size, device=device)
        from evaluation.retrieval import best_caption

        best, _ = best_caption(images, text, text_to_image, device=device)
        best = best.cpu().numpy()
        result.predictions = {
            "direction": np.asarray(["text_to_image"] * len(texts) + ["image_to_text"] * len(images), dtype=object),
            "query": np.concatenate([caption_ids, image_keys.astype(object)]),
            "text": np.asarray(texts + [texts[b] for b in best], dtype=object),
            "target": np.concatenate([image_keys[text_to_image].astype(object), caption_ids[best]]),
            "rank": np.concatenate([text_ranks, image_ranks]),
            "topk": [list(image_keys[row]) for row in t_top] + [list(caption_ids[row]) for row in i_top],
        }
    return result


def evaluate_linear_probe_dataset(model: torch.nn.Module, cfg: EvalConfig) -> EvalResult:
    if not cfg.train_dataset:
        raise ValueError(
            "eval.task linear_probe needs eval.train_dataset (its training split); eval.dataset is the test split"
        )
    train = open_eval_dataset(cfg.train_dataset, cfg, need_labels=True, what="eval.train_dataset")
    test = open_eval_dataset(cfg.dataset, cfg, need_labels=True)
    val = (
        open_eval_dataset(cfg.val_dataset, cfg, need_labels=True, what="eval.val_dataset") if cfg.val_dataset else None
    )
    splits = [s for s in (train, val, test) if s is not None]
    folder = train.classes
    if folder is not None:
        for s in splits[1:]:
            if s.classes is None or not set(s.classes) <= set(folder):
                raise ValueError(
                    f"{s.source}: its classes must be class folders of eval.train_dataset {train.source} as well"
                )
    all_labels = [v for s in splits for v in s.meta.column("label").to_pylist()]
    classnames_file = load_classnames(cfg.classnames, cfg.dataset_name, cfg) if cfg.classnames else train.classnames
    classnames, idx, names_from = resolve_classes(
        all_labels, folder_classes=folder, classnames=classnames_file, need_names=False
    )
    bounds = np.cumsum([0] + [s.num_rows for s in splits])
    labels = {id(s): idx[bounds[i] : bounds[i + 1]] for i, s in enumerate(splits)}
    embs = {id(s): embed_dataset_images(s, model, cfg) for s in splits}

    def xy(s):
        ok = embs[id(s)]["ok"]
        return embs[id(s)]["features"][ok], labels[id(s)][ok]

    train_x, train_y = xy(train)
    test_x, test_y = xy(test)
    val_x, val_y = xy(val) if val is not None else (None, None)
    probe = linear_probe(
        train_x,
        train_y,
        test_x,
        test_y,
        num_classes=len(classnames),
        val_x=val_x,
        val_y=val_y,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        c_range=cfg.probe_c_range,
        steps_per_decade=cfg.probe_steps_per_decade,
        max_iter=cfg.probe_max_iter,
    )
    skipped = _skipped(test, embs[id(test)])
    skipped["train_images_skipped"] = _skipped(train, embs[id(train)])["count"]
    result = EvalResult(
        task="linear_probe",
        metrics=probe.metrics,
        num_samples=len(test_y),
        skipped=skipped,
        details={
            "num_classes": len(classnames),
            "classnames_from": names_from,
            "num_train": len(train_y),
            "num_val": 0 if val_x is None else len(val_y),
            "C_search": [vars(t) for t in probe.trials],
            "refit_converged": probe.converged,
            "features": "encode_image, not normalised",
        },
        confusion=confusion_matrix(test_y, probe.predictions, len(classnames)),
        classnames=classnames,
    )
    if cfg.dump_predictions:
        scores = np.where(np.isfinite(probe.scores), probe.scores, np.finfo(np.float64).min)
        keys = test.meta.column("key").to_numpy(zero_copy_only=False)[embs[id(test)]["ok"]]
        result.predictions = {
            "key": keys.astype(object),
            "label": test_y,
            "label_name": np.asarray([classnames[i] for i in test_y], dtype=object),
            "pred": probe.predictions,
            "pred_name": np.asarray([classnames[i] for i in probe.predictions], dtype=object),
            "correct": probe.predictions == test_y,
            "rank": target_ranks(scores, test_y),
            "top5": topk_classes(scores, 5),
        }
    return result


TASKS = {
    "zeroshot": evaluate_zeroshot_dataset,
    "retrieval": evaluate_retrieval_dataset,
    "linear_probe": evaluate_linear_probe_dataset,
}


def evaluate_dataset(model: torch.nn.Module, cfg: EvalConfig) -> EvalResult:
    """Run `cfg.task` on `cfg.dataset` with an in-memory model; writes nothing."""
    if not cfg.dataset:
        raise ValueError(
            "eval.dataset is not set: give the data set to evaluate on (ImageFolder tree, CSV/Parquet table or pipeline shards)"
        )
    was_training = model.training
    try:
        return TASKS[cfg.task](model, cfg)
    finally:
        model.train(was_training)


def run_evaluation(cfg: EvalConfig, model: Optional[torch.nn.Module] = None) -> dict:
    """Evaluate, write `cfg.output` (+ report, + predictions) and return the CLIP_benchmark JSON."""
    if not cfg.dataset:
        raise ValueError(
            "eval.dataset is not set: give the data set to evaluate on (ImageFolder tree, CSV/Parquet table or pipeline shards)"
        )
    if cfg.dump_predictions and not cfg.output:
        raise ValueError("--dump-predictions needs eval.output: the predictions are written next to it")
    if model is None:
        if not cfg.model:
            raise ValueError(
                "eval.model is not set: give a run dir, a final/ dir or a checkpoint file "
                "(OpenAI .pt, OpenCLIP .pt/.safetensors)"
            )
        from training.model import load_model

        model = load_model(cfg.model, name=cfg.model_name, storage=cfg)
    result = evaluate_dataset(model, cfg)
    obj = write_outputs(result, cfg)
    print_summary(obj)
    return obj
