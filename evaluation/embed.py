"""Image and text embeddings for evaluation: one per-batch function, run by a plain loop or by Ray.

The per-batch work (`ImageEmbedder`, `TextEmbedder`) takes a batch as a dict of numpy arrays and
returns one; it knows no Ray. `embed_local` runs it in a plain loop (small sets, and a training
run's validation); `embed_ray` runs the same class as a Ray Data `map_batches` stage on an actor
pool (CPU or GPU actors), so a cluster embeds a large set in parallel.

Preprocessing is CLIP's eval transform, `training.model.eval_pixels` (open_clip's resize of the
shorter side, centre crop, RGB) on the decode threads, giving uint8 [S, S, 3] per image; the
stacked uint8 batch is normalised on the model's device by `training.model.normalize_pixels`. The
pipeline's CLIP-score filter uses the same two functions.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from storage import StorageConfig, open_file
from training.model import eval_pixels, normalize_pixels

Batch = dict[str, np.ndarray]
ModelSource = Union[str, "torch.nn.Module"]

_AUTOCAST = {"fp32": None, "amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}


def open_image(value: Any, storage: Optional[StorageConfig] = None) -> Image.Image:
    """A PIL image from encoded bytes, a local path or fsspec URL, or a PIL image; fully decoded."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(bytes(value)))
    elif isinstance(value, (str, os.PathLike)):
        with open_file(str(value), "rb", storage) as fh:
            img = Image.open(io.BytesIO(fh.read()))
    else:
        raise TypeError(f"cannot read an image from a {type(value).__name__}")
    img.load()  # decode now, so a truncated file fails here and is counted
    return img


def clip_preprocess(
    img: Image.Image, image_size: int, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None
) -> np.ndarray:
    """float32 [3, S, S] for one image: `eval_pixels` then `normalize_pixels` (mean/std default: CLIP's).

    For callers that want the encoder's input of a single image on the CPU; batches go through
    `ImageEmbedder`, which normalises on the device.
    """
    pixels = torch.from_numpy(eval_pixels(img, image_size))[None]
    return np.ascontiguousarray(normalize_pixels(pixels, mean, std)[0].numpy())


def _load(model: ModelSource, model_name: Optional[str], storage: Optional[StorageConfig]):
    if isinstance(model, str):
        from training.model import load_model

        return load_model(model, name=model_name, storage=storage)
    return model


class _Encoder:
    def __init__(
        self,
        model: ModelSource,
        *,
        model_name: Optional[str] = None,
        device: str = "cpu",
        precision: str = "fp32",
        storage: Optional[StorageConfig] = None,
    ):
        if precision not in _AUTOCAST:
            raise ValueError(f"precision must be one of {sorted(_AUTOCAST)}, got {precision!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("eval.use_gpu is set but this worker sees no CUDA device")
        self.device = torch.device(device)
        self.storage = storage  # how to reach a remote model and remote images
        self.model = _load(model, model_name, storage).to(self.device).eval()
        self.precision = precision

    def _autocast(self):
        dtype = _AUTOCAST[self.precision]
        if dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)


class ImageEmbedder(_Encoder):
    """Per-batch image embedding: `image` (bytes, path/URL or PIL) -> `image_features` [B, D].

    Output columns: every input column except `image`, plus `image_features` (float32 [B, D],
    projected, not normalised; zeros where the image failed), `ok` (bool [B]) and `error` (str [B],
    "" where ok). A corrupt image is reported in `ok`/`error`, never raised.
    """

    def __init__(
        self,
        model: ModelSource,
        *,
        model_name: Optional[str] = None,
        device: str = "cpu",
        precision: str = "fp32",
        decode_threads: int = 0,
        storage: Optional[StorageConfig] = None,
    ):
        super().__init__(model, model_name=model_name, device=device, precision=precision, storage=storage)
        self.image_size = int(self.model.image_size)
        self.decode_threads = decode_threads
        self._pool = ThreadPoolExecutor(decode_threads) if decode_threads > 1 else None

    def _prepare(self, value: Any) -> tuple[Optional[np.ndarray], str]:
        """(uint8 [S, S, 3] or None, error message or "")."""
        try:
            if value is None:
                raise ValueError("no image (empty value)")
            return eval_pixels(open_image(value, self.storage), self.image_size), ""
        except Exception as exc:  # any decode failure is counted, not fatal
            return None, f"{type(exc).__name__}: {exc}"[:300]

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Batch:
        values = list(batch["image"])
        prepared = list(self._pool.map(self._prepare, values)) if self._pool else [self._prepare(v) for v in values]
        ok = np.array([arr is not None for arr, _ in prepared], dtype=bool)
        errors = np.array([err for _, err in prepared], dtype=object)
        features = np.zeros((len(values), int(self.model.config["embed_dim"])), dtype=np.float32)
        if ok.any():
            pixels = torch.from_numpy(np.stack([arr for arr, _ in prepared if arr is not None])).to(self.device)
            x = normalize_pixels(pixels)  # uint8 crosses to the device; float32 made there
            with self._autocast():
                features[ok] = self.model.encode_image(x).float().cpu().numpy()
        out = {k: v for k, v in batch.items() if k != "image"}
        out.update(image_features=features, ok=ok, error=errors)
        return out


class TextEmbedder(_Encoder):
    """Per-batch text embedding: `text` (str [B]) -> `text_features` float32 [B, D] (projected)."""

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Batch:
        from training.tokenizer import tokenize

        tokens = tokenize([str(t) for t in batch["text"]], context_length=int(self.model.context_length))
        with self._autocast():
            features = self.model.encode_text(tokens.to(self.device))
        out = dict(batch)
        out["text_features"] = features.float().cpu().numpy()
        return out


def iter_slices(columns: dict[str, Sequence], batch_size: int) -> Iterable[Batch]:
    """Batches of `batch_size` rows from equal-length columns."""
    n = len(next(iter(columns.values())))
    for start in range(0, n, batch_size):
        yield {k: _as_array(v[start : start + batch_size]) for k, v in columns.items()}


def _as_array(values: Sequence) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values
    arr = np.empty(len(values), dtype=object)
    arr[:] = list(values)
    return arr


def concat_batches(batches: Iterable[Batch]) -> Batch:
    """Concatenate the per-batch outputs column by column (an empty input gives {})."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        for key, value in batch.items():
            parts.setdefault(key, []).append(np.asarray(value))
    return {k: np.concatenate(v) for k, v in parts.items()}


def embed_local(
    fn: Callable[[Batch], Batch], batches: Iterable[Batch], progress: Optional[Callable[[int], None]] = None
) -> Batch:
    """Run the per-batch function over `batches` in this process and concatenate."""
    outputs = []
    for batch in batches:
        outputs.append(fn(batch))
        if progress is not None:
            progress(len(next(iter(batch.values()))))
    return concat_batches(outputs)


def embed_ray(
    ds,
    embedder_cls: type,
    constructor_kwargs: dict[str, Any],
    *,
    batch_size: int,
    use_gpu: bool = False,
    num_actors: Optional[int] = None,
    cpus_per_actor: float = 1.0,
) -> Batch:
    """Run the per-batch class as a Ray Data actor-pool stage over `ds`; rows come back in order.

    `num_actors` None: a pool autoscaling from 1 to the cluster's GPUs (use_gpu) or to
    CPUs / cpus_per_actor. Each actor builds the model once (from a path, or from the module that
    Ray ships through the object store).
    """
    import ray
    from ray.data import ActorPoolStrategy

    if num_actors is None:
        resources = ray.cluster_resources()
        if use_gpu:
            limit = int(resources.get("GPU", 0))
            if limit < 1:
                raise ValueError("eval.use_gpu is set but the Ray cluster has no GPU; unset it or add GPU nodes")
        else:
            limit = max(1, int(resources.get("CPU", 1) // max(cpus_per_actor, 1e-3)))
        compute = ActorPoolStrategy(min_size=1, max_size=limit)
    else:
        compute = ActorPoolStrategy(size=num_actors)
    kwargs = dict(constructor_kwargs, device="cuda" if use_gpu else "cpu")
    out = ds.map_batches(
        embedder_cls,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        batch_format="numpy",
        compute=compute,
        num_gpus=1 if use_gpu else 0,
        num_cpus=cpus_per_actor,
    )
    out.context.execution_options.preserve_order = True  # row order = input order: stable tie rules
    return concat_batches(out.iter_batches(batch_size=None, batch_format="numpy"))


def normalize(features: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """L2-normalised rows, float32 tensor."""
    return F.normalize(
        torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features).float(), dim=-1
    )
