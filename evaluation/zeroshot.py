"""Zero-shot classification as in the CLIP paper.

For each class, every prompt template is filled with the class name and embedded by the text
tower; the embeddings are L2-normalised, averaged and normalised again, giving one row of the
classifier [C, D]. An image's logits are 100 x the cosine between its embedding and each row.
Metrics: see `evaluation.classification` (acc1, acc5, mean_per_class_recall; tie rule).

The classifier is cached: in memory for the process (keyed by the model object and the version
counters of its tensors, which every in-place update such as an optimizer step bumps), and on disk
under `cache_dir` when given (keyed by a sha256 of the weights, the class names and the templates).
"""

from __future__ import annotations

import hashlib
import io
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.datasets import resolve_classes
from evaluation.classification import classification_metrics, confusion_matrix, predict, target_ranks, topk_classes
from evaluation.embed import ImageEmbedder, TextEmbedder, embed_local, iter_slices
from evaluation.results import EvalResult, skipped_summary
from evaluation.templates import check_templates, fill_template, load_templates
from storage import StorageConfig, read_file, write_file

_MEMORY_CACHE: dict[tuple, torch.Tensor] = {}
_MEMORY_CACHE_MAX = 8


def classifier_from_text_features(text_features: torch.Tensor) -> torch.Tensor:
    """[C, T, D] prompt embeddings -> [C, D]: normalise, average over templates, normalise."""
    if text_features.ndim != 3:
        raise ValueError(f"text features must be [classes, templates, D], got shape {tuple(text_features.shape)}")
    mean = F.normalize(text_features.double(), dim=-1).mean(dim=1)
    return F.normalize(mean, dim=-1).float()


def zeroshot_logits(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """[N, C] float32 = 100 x cosine(image, class); summed in float64 so ties are exact."""
    img = F.normalize(torch.as_tensor(image_features).double(), dim=-1)
    return (100.0 * (img @ torch.as_tensor(classifier).double().T)).float()


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's state dict (names, shapes, bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _prompts_key(model: torch.nn.Module, classnames: Sequence[str], templates: Sequence[str]) -> str:
    text = (
        "\x1f".join(classnames) + "\x1e" + "\x1f".join(templates) + "\x1e" + str(getattr(model, "context_length", ""))
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _memory_key(model: torch.nn.Module, classnames: Sequence[str], templates: Sequence[str]) -> tuple:
    """Cheap: the model object, its tensors' storage and version counters, the prompts."""
    tensors = list(model.state_dict(keep_vars=True).values())
    return (
        id(model),
        tuple(t.data_ptr() for t in tensors[:4]),
        tuple(t._version for t in tensors),
        _prompts_key(model, classnames, templates),
    )


def _disk_key(model: torch.nn.Module, classnames: Sequence[str], templates: Sequence[str]) -> str:
    h = hashlib.sha256(model_fingerprint(model).encode())
    h.update(_prompts_key(model, classnames, templates).encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def build_classifier(
    model: torch.nn.Module,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
    device: Union[str, torch.device] = "cpu",
    cache_dir: Optional[str] = None,
    storage: Optional[StorageConfig] = None,
    encode_texts: Optional[Callable[[list[str]], np.ndarray]] = None,
) -> torch.Tensor:
    """The zero-shot classifier [C, D] float32 (rows L2-normalised), from cache when possible.

    encode_texts: prompts -> [n, D] projected text features (e.g. on Ray GPU actors); by default
    the prompts are encoded here in batches of `batch_size`.
    """
    if not classnames:
        raise ValueError("zero-shot classification needs at least one class name")
    check_templates(templates)
    key = _memory_key(model, classnames, templates)
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key].clone()
    path = (
        f"{cache_dir.rstrip('/')}/zeroshot-classifier-{_disk_key(model, classnames, templates)}.npy"
        if cache_dir
        else None
    )
    classifier = _read_cached(path, storage) if path else None
    if classifier is None:
        prompts = [fill_template(t, c) for c in classnames for t in templates]
        if encode_texts is None:
            embedder = TextEmbedder(model, device=str(device))

            def encode_texts(texts: list[str]) -> np.ndarray:
                return embed_local(embedder, iter_slices({"text": texts}, batch_size))["text_features"]

        features = torch.from_numpy(np.asarray(encode_texts(prompts), dtype=np.float32))
        text = features.reshape(len(classnames), len(templates), -1)
        classifier = classifier_from_text_features(text)
        if path:
            _write_cached(path, classifier, storage)
    if len(_MEMORY_CACHE) >= _MEMORY_CACHE_MAX:
        _MEMORY_CACHE.pop(next(iter(_MEMORY_CACHE)))
    # Keyed after the build too: embedding may have moved the weights to another device.
    _MEMORY_CACHE[_memory_key(model, classnames, templates)] = classifier.clone()
    return classifier


def _read_cached(path: str, storage: Optional[StorageConfig]) -> Optional[torch.Tensor]:
    data = read_file(path, storage)
    return None if data is None else torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))


def _write_cached(path: str, classifier: torch.Tensor, storage: Optional[StorageConfig]) -> None:
    buf = io.BytesIO()
    np.save(buf, classifier.numpy(), allow_pickle=False)
    write_file(path, buf.getvalue(), storage)


def score_zeroshot(
    image_features: np.ndarray,
    labels: np.ndarray,
    classifier: torch.Tensor,
    classnames: Sequence[str],
    keys: Optional[Sequence[str]] = None,
    skipped: Optional[dict] = None,
    details: Optional[dict] = None,
    predictions: bool = False,
) -> EvalResult:
    """Metrics (and optionally per-sample predictions) from image features [N, D] and labels [N]."""
    logits = zeroshot_logits(torch.from_numpy(np.asarray(image_features, np.float32)), classifier).numpy()
    labels = np.asarray(labels, dtype=np.int64)
    metrics = classification_metrics(logits, labels)
    pred = predict(logits)
    result = EvalResult(
        task="zeroshot",
        metrics=metrics,
        num_samples=len(labels),
        skipped=skipped or skipped_summary([], []),
        details={"num_classes": len(classnames), **(details or {})},
        confusion=confusion_matrix(labels, pred, len(classnames)),
        classnames=list(classnames),
    )
    if predictions:
        top = topk_classes(logits, 5)
        result.predictions = {
            "key": np.asarray(keys if keys is not None else np.arange(len(labels)).astype(str), dtype=object),
            "label": labels,
            "label_name": np.asarray([classnames[i] for i in labels], dtype=object),
            "pred": pred,
            "pred_name": np.asarray([classnames[i] for i in pred], dtype=object),
            "correct": pred == labels,
            "rank": target_ranks(logits, labels),
            "top5": top,
            "top5_logits": np.take_along_axis(logits, top, axis=1),
        }
    return result


def evaluate_zeroshot(
    model: torch.nn.Module,
    images: Sequence[Any],
    labels: Sequence[Any],
    classnames: Sequence[str],
    templates: Union[None, str, Sequence[str]] = None,
    *,
    batch_size: int = 64,
    device: str = "cpu",
    classifier: Optional[torch.Tensor] = None,
    predictions: bool = False,
    decode_threads: int = 0,
) -> EvalResult:
    """Zero-shot classification of in-memory images, in this process (no Ray).

    images: encoded bytes, paths/URLs or PIL images; labels: class indices or class names;
    templates: a list, a built-in name / file (see `evaluation.templates`), or None for the CLIP
    paper's 80 ImageNet templates. Images that fail to decode are skipped and counted.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("no images to evaluate")
    if isinstance(templates, str) or templates is None:
        templates = load_templates(templates)
    classnames, idx, _ = resolve_classes(labels, classnames=classnames)
    was_training = model.training
    try:
        if classifier is None:
            classifier = build_classifier(model, classnames, templates, device=device)
        embedder = ImageEmbedder(model, device=device, decode_threads=decode_threads)
        keys = np.arange(len(images)).astype(str)
        out = embed_local(embedder, iter_slices({"image": images, "label": idx, "key": keys}, batch_size))
    finally:
        model.train(was_training)
    ok = out["ok"]
    if not ok.any():
        raise ValueError(f"none of the {len(images)} images could be decoded: {out['error'][0]}")
    return score_zeroshot(
        out["image_features"][ok],
        out["label"][ok].astype(np.int64),
        classifier,
        classnames,
        keys=out["key"][ok],
        predictions=predictions,
        skipped=skipped_summary(list(out["key"][~ok]), list(out["error"][~ok])),
        details={"num_templates": len(templates)},
    )
