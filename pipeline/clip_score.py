"""CLIP score of an (image, caption) pair: the cosine similarity of their embeddings under a
trained CLIP (DataComp's "CLIP score" filter). Plain torch; the runner puts `ClipScorer` on a Ray
Data actor pool (GPU when `data.filters.clip_score.num_gpus > 0`).

Images are prepared as CLIP's evaluation transform does: RGB, shortest side resized to the
model's `image_size` (bicubic), centre crop, scaled to [0, 1], normalised with CLIP's mean/std.
"""
from __future__ import annotations

import io
import time
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.resume import SCORE, ShardSpec, marker
from storage import Folder

SCORE_SCHEMA = pa.schema([pa.field("key", pa.string()), pa.field("score", pa.float32())])


def _prepare(jpg: bytes, size: int) -> np.ndarray:
    """Encoded image -> float32 [3, size, size] in [0, 1]."""
    image = Image.open(io.BytesIO(jpg))
    image.draft("RGB", (size, size))
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0


class ClipScorer:
    """Loads a CLIP checkpoint once; `scores(jpgs, captions)` -> float32 [N] cosine similarities."""

    def __init__(self, model: str, model_name: Optional[str] = None, device: Optional[str] = None,
                 batch_size: int = 256):
        import torch

        try:
            from training.model import image_mean_std, load_model
            from training.tokenizer import tokenize
        except ImportError as exc:  # pragma: no cover - the training package ships with clipray
            raise RuntimeError(f"the CLIP-score filter needs training.model and training.tokenizer: {exc}") from exc
        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(model, model_name, device=self.device)
        self.tokenize = tokenize
        mean, std = image_mean_std()
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.batch_size = batch_size

    def scores(self, jpgs: Sequence[bytes], captions: Sequence[str]) -> np.ndarray:
        torch = self.torch
        size, context = int(self.model.image_size), int(self.model.context_length)
        out = []
        with torch.inference_mode():
            for i in range(0, len(jpgs), self.batch_size):
                images = np.stack([_prepare(j, size) for j in jpgs[i:i + self.batch_size]])
                x = (torch.from_numpy(images).to(self.device) - self.mean) / self.std
                tokens = self.tokenize([c or "" for c in captions[i:i + self.batch_size]], context).to(self.device)
                img = torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)
                txt = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
                out.append((img * txt).sum(-1).cpu().numpy().astype(np.float32))
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def score_shard(self, spec: ShardSpec, out: Folder, accepted: int) -> dict[str, Any]:
        """Score the accepted rows of a downloaded shard; commits `_work/score/<shard>.parquet`."""
        start = time.time()
        out.remove([spec.score_file, marker(SCORE, spec)])
        if accepted:
            table = out.read_parquet(spec.accepted_file, columns=["key", "jpg", "caption"])
            scores = self.scores(table.column("jpg").to_pylist(), table.column("caption").to_pylist())
            out.write_parquet(spec.score_file, pa.table({"key": table.column("key"), "score": pa.array(scores)},
                                                        schema=SCORE_SCHEMA), row_group_rows=65_536)
        stats = {"shard": spec.name, "rows": accepted, "scored": accepted, "duration_s": round(time.time() - start, 3)}
        out.write_json(marker(SCORE, spec), stats)
        return stats
