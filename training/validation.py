"""Validation during training, computed by all workers: each embeds its share of the held-out set,
the features are all-gathered, rank 0 computes the metrics.

- `contrastive_metrics`: the contrastive loss over the held-out pairs (in chunks of the training
  batch, at the current temperature) and image<->text retrieval recall@k over the whole set.
- `ZeroShot`: zero-shot classification accuracy on a labelled set (`train.zeroshot_data`), with
  the evaluation package's prompt ensembling and metrics; the prompts are split over the workers
  too.
- `validation_metrics`: both on one loop's model, from `evaluation_model(loop)` (a model that runs
  without collectives on every strategy, so ranks may hold uneven shares, or none).
- `Validator`: what a Train worker runs at each validation (its share of `train.val_data` read
  once through the training ingest with centre crops, then `validation_metrics`).
The metric functions are pure torch + numpy; the caller hands over the embedding functions and a
gather function.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from training.loss import contrastive_loss

Gather = Callable[[Any], list]  # an object of this rank -> [object of each rank]


@torch.no_grad()
def contrastive_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float,
    logit_bias: Optional[float] = None,
    *,
    loss: str = "clip",
    chunk: int = 256,
    recall_k: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """{"val_loss", "val_image_retrieval_recall@k", "val_text_retrieval_recall@k",
    "val_mean_retrieval_recall@k" (the mean of the two)} for N held-out pairs (features [N, D],
    normalised; row i of each is a pair).

    The loss is the mean over consecutive chunks of `chunk` pairs (a last chunk of fewer than 2
    pairs is left out), weighted by chunk size, at `logit_scale`: it depends on the temperature, so
    it compares runs of one temperature only; the recalls do not. Recall: image retrieval ranks each caption's image
    among all N images, text retrieval each image's caption among all N captions.
    """
    from evaluation.retrieval import retrieval_metrics

    n = image_features.shape[0]
    if n < 2:
        raise ValueError(f"validation needs at least 2 held-out pairs, got {n}")
    image_features, text_features = image_features.float(), text_features.float()
    scale = torch.tensor(float(logit_scale))
    bias = None if logit_bias is None else torch.tensor(float(logit_bias))
    total, weight = 0.0, 0
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        if stop - start < 2:
            continue
        value = contrastive_loss(
            loss, image_features[start:stop], text_features[start:stop], scale, bias, distributed=False
        )
        total += float(value) * (stop - start)
        weight += stop - start
    metrics = {"val_loss": total / weight, "val_samples": n}
    recalls = retrieval_metrics(image_features, text_features, np.arange(n), recall_k=tuple(recall_k))
    metrics.update({f"val_{k}": v for k, v in recalls.items()})
    for k in recall_k:  # both directions in one number: a sweep's default metric (scale-free)
        metrics[f"val_mean_retrieval_recall@{k}"] = 0.5 * (
            recalls[f"image_retrieval_recall@{k}"] + recalls[f"text_retrieval_recall@{k}"]
        )
    return metrics


@contextmanager
def evaluation_model(loop: Any) -> Iterator[torch.nn.Module]:
    """A `ContrastiveModel` with the full weights of a `training.loop.TrainLoop`, in eval mode, that
    runs without collectives on every strategy, so ranks may embed different numbers of batches (or
    none). Under FSDP it is a plain copy gathered from the shards for the block (every rank must
    enter; each holds one full copy of the weights meanwhile); otherwise the loop's unwrapped module."""
    was_training = loop.module.training
    module = _gathered_copy(loop) if loop.fsdp else loop.module
    module.eval()
    try:
        yield module
    finally:
        loop.module.train(was_training)


def _gathered_copy(loop: Any) -> torch.nn.Module:
    from torch.distributed.tensor import DTensor

    from training.loop import ContrastiveModel
    from training.model import create_model

    state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in loop.module.state_dict().items()}
    copy = ContrastiveModel(create_model(loop.module.clip.config, device="meta"), loop.settings.loss)
    copy.load_state_dict(state, strict=True, assign=True)
    return copy.to(loop.device)


@torch.no_grad()
def embed(
    loop: Any, module: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised features of `module` (from `evaluation_model`) in the loop's precision: images uint8
    [B, H, W, 3], tokens [B, L] -> (image [B, D] float32, text [B, D] float32)."""
    images = images.to(loop.device, non_blocking=True)
    tokens = tokens.to(loop.device, non_blocking=True)
    with loop.autocast():
        image_f, text_f, _, _ = module(images, tokens)
    return image_f.float(), text_f.float()


def concat_features(parts: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """Concatenate per-batch (or per-rank) features, allowing none: [0, dim] when empty."""
    parts = [p for p in parts if p is not None and p.shape[0]]
    return torch.cat(parts).float() if parts else torch.zeros(0, dim)


class ZeroShot:
    """Zero-shot accuracy on a labelled set, every worker embedding a share of it.

    spec: an evaluation data set (ImageFolder tree, table with a label column, or shards);
    classnames / templates: as `eval.classnames` / `eval.templates` (None: the labels' names,
    the CLIP paper's ImageNet templates).
    """

    def __init__(
        self,
        spec: str,
        classnames: Optional[str],
        templates: Optional[str],
        *,
        rank: int,
        world_size: int,
        batch_size: int = 256,
    ):
        from evaluation.datasets import open_dataset, resolve_classes
        from evaluation.templates import load_classnames, load_templates

        self.dataset = open_dataset(spec, need_labels=True, what="train.zeroshot_data")
        meta = self.dataset.meta
        given = load_classnames(classnames) if classnames else None
        self.classnames, index, _ = resolve_classes(
            meta.column("label").to_pylist(), folder_classes=self.dataset.classes, classnames=given
        )
        row_ids = meta.column("row_id").to_pylist()
        self.label_of = dict(zip(row_ids, np.asarray(index, dtype=np.int64).tolist()))
        self.templates = load_templates(templates)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        total = len(row_ids)
        self.mine = set(row_ids[rank * total // world_size : (rank + 1) * total // world_size])

    def _my_images(self) -> tuple[list, np.ndarray]:
        """(images of this rank's rows, their row ids), reading only the chunks that hold them."""
        from evaluation.datasets import read_chunk

        ds = self.dataset
        images, rows = [], []
        if not self.mine:
            return images, np.zeros(0, np.int64)
        lo, hi = min(self.mine), max(self.mine) + 1
        for chunk in ds.chunks:
            if chunk.row_start + chunk.num_rows <= lo or chunk.row_start >= hi:
                continue
            got = read_chunk(chunk, ds.image_in_parquet, ds.image_column, ds.meta, ds.storage)
            for row_id, image in zip(got["row_id"], got["image"]):
                if int(row_id) in self.mine:
                    rows.append(int(row_id))
                    images.append(image)
        return images, np.asarray(rows, dtype=np.int64)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, device: torch.device, gather: Gather) -> dict[str, float]:
        """{"zeroshot_acc1", "zeroshot_acc5", "zeroshot_mean_per_class_recall"} on rank 0, {} elsewhere.
        Every rank must call (collectives inside)."""
        from evaluation.embed import ImageEmbedder, TextEmbedder, embed_local, iter_slices
        from evaluation.templates import fill_template
        from evaluation.zeroshot import classifier_from_text_features, score_zeroshot

        was_training = model.training
        model.eval()
        try:
            prompts = [fill_template(t, c) for c in self.classnames for t in self.templates]
            lo, hi = (self.rank * len(prompts) // self.world_size, (self.rank + 1) * len(prompts) // self.world_size)
            text = TextEmbedder(model, device=str(device))
            mine = (
                embed_local(text, iter_slices({"text": prompts[lo:hi]}, self.batch_size))["text_features"]
                if hi > lo
                else np.zeros((0, 0), np.float32)
            )
            text_parts = [p for p in gather(np.asarray(mine, np.float32)) if p.size]
            features = torch.from_numpy(np.concatenate(text_parts))
            classifier = classifier_from_text_features(features.reshape(len(self.classnames), len(self.templates), -1))

            images, rows = self._my_images()
            if len(images):
                out = embed_local(
                    ImageEmbedder(model, device=str(device)),
                    iter_slices({"image": images, "row": rows}, self.batch_size),
                )
                ok = out["ok"]
                mine_img = (np.asarray(out["image_features"])[ok], np.asarray(out["row"])[ok])
            else:
                mine_img = (np.zeros((0, 0), np.float32), np.zeros(0, np.int64))
        finally:
            model.train(was_training)
        parts = gather(mine_img)
        if self.rank != 0:
            return {}
        feats = np.concatenate([f for f, _ in parts if f.size])
        rows = np.concatenate([r for _, r in parts])
        labels = np.asarray([self.label_of[int(r)] for r in rows], dtype=np.int64)
        result = score_zeroshot(feats, labels, classifier, self.classnames)
        return {f"zeroshot_{k}": float(v) for k, v in result.metrics.items()}


class Validator:
    """Held-out metrics for one Train worker: the contrastive loss and retrieval on `train.val_data`
    and, with `train.zeroshot_data`, zero-shot accuracy. The data are opened at the first call.
    Every rank must call `evaluate` (collectives inside); rank 0 gets the metrics, others {}."""

    def __init__(
        self,
        train: Any,
        val_shards: Sequence[Any],
        val_fs: Any,
        loop: Any,
        *,
        rank: int,
        world_size: int,
        settings: Any,
    ):
        self.train, self.val_shards, self.val_fs, self.loop = train, val_shards, val_fs, loop
        self.rank, self.world_size, self.settings = rank, world_size, settings
        self._data = None
        self._zeroshot: Optional[ZeroShot] = None
        self._loaded = False

    def _load(self) -> None:
        from training.ingest import PreprocessSettings, eval_dataset

        clip = self.loop.module.clip
        preprocess = PreprocessSettings(
            image_size=clip.image_size, context_length=clip.context_length, train=False, decoder=self.train.decoder
        )
        self._data = eval_dataset(
            self.val_shards,
            self.val_fs,
            rank=self.rank,
            world_size=self.world_size,
            settings=self.settings,
            preprocess=preprocess,
        )
        if self.train.zeroshot_data:
            self._zeroshot = ZeroShot(
                self.train.zeroshot_data,
                self.train.zeroshot_classnames,
                self.train.zeroshot_templates,
                rank=self.rank,
                world_size=self.world_size,
            )
        self._loaded = True

    def evaluate(self) -> dict:
        from training.ingest import iter_eval_batches

        if not self._loaded:
            self._load()
        return validation_metrics(
            self.loop,
            iter_eval_batches(self._data, self.settings.local_batch),
            rank=self.rank,
            loss=self.train.loss,
            chunk=self.train.val_batch_size or self.train.batch_size,
            zeroshot=self._zeroshot,
        )


def validation_metrics(
    loop: Any,
    batches: Iterable[dict],
    *,
    rank: int,
    loss: str,
    chunk: int,
    zeroshot: Optional[ZeroShot] = None,
) -> dict:
    """The held-out metrics of a `training.loop.TrainLoop` on rank 0 ({} elsewhere): this rank's
    `batches` (dicts with "image" uint8 [B, H, W, 3] and "tokens" [B, L]; any number, none included)
    are embedded, the features gathered in rank order, `contrastive_metrics` computed, and with
    `zeroshot` its accuracy. Every rank must call (collectives inside, none per batch: the model
    runs from `evaluation_model`, so uneven shares are fine under every strategy)."""
    from training.trainer_state import gather_objects

    with evaluation_model(loop) as module:
        dim = int(module.clip.config["embed_dim"])
        images, texts = [], []
        for batch in batches:
            image_f, text_f = embed(loop, module, batch["image"], batch["tokens"])
            images.append(image_f.cpu())
            texts.append(text_f.cpu())
        gathered = gather_objects((concat_features(images, dim), concat_features(texts, dim)))
        metrics: dict[str, Any] = {}
        if rank == 0:
            bias = module.logit_bias
            metrics = contrastive_metrics(
                concat_features([g[0] for g in gathered], dim),
                concat_features([g[1] for g in gathered], dim),
                module.clip.logit_scale.exp().item(),
                None if bias is None else bias.item(),
                loss=loss,
                chunk=chunk,
            )
        if zeroshot is not None:
            with torch.no_grad():
                metrics.update(zeroshot.evaluate(module.clip, loop.device, gather_objects))
    return metrics
