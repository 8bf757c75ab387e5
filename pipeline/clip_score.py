"""CLIP score of an (image, caption) pair: the cosine similarity of their embeddings under a
trained CLIP (DataComp's "CLIP score" filter). Plain torch; the runner puts `ClipScorer` on a Ray
Data actor pool (GPU when `data.filters.clip_score.num_gpus > 0`).

Images go through CLIP's eval transform, the one evaluation uses:
`training.model.eval_pixels` (open_clip's resize of the shorter side to the model's `image_size`,
centre crop, RGB; uint8) on the CPU, then `normalize_pixels` on the scorer's device.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from pipeline.resume import SCORE, ShardSpec, marker
from storage import Folder, StorageConfig
from training.model import eval_pixels, load_model, normalize_pixels
from training.tokenizer import tokenize

SCORE_SCHEMA = pa.schema([pa.field("key", pa.string()), pa.field("score", pa.float32())])


class ClipScorer:
    """Loads a CLIP checkpoint once; `scores(jpgs, captions)` -> float32 [N] cosine similarities."""

    def __init__(
        self,
        model: str,
        model_name: Optional[str] = None,
        device: Optional[str] = None,
        batch_size: int = 256,
        storage: Optional[StorageConfig] = None,
    ):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(model, model_name, device=self.device, storage=storage)
        self.batch_size = batch_size

    def scores(self, jpgs: Sequence[bytes], captions: Sequence[str]) -> np.ndarray:
        size, context = int(self.model.image_size), int(self.model.context_length)
        out = []
        with torch.inference_mode():
            for i in range(0, len(jpgs), self.batch_size):
                pixels = np.stack([eval_pixels(j, size) for j in jpgs[i : i + self.batch_size]])
                x = normalize_pixels(torch.from_numpy(pixels).to(self.device))
                tokens = tokenize([c or "" for c in captions[i : i + self.batch_size]], context).to(self.device)
                img = F.normalize(self.model.encode_image(x).float(), dim=-1)
                txt = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
                out.append((img * txt).sum(-1).cpu().numpy().astype(np.float32))
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def score_shard(self, spec: ShardSpec, out: Folder, accepted: int) -> dict[str, Any]:
        """Score the accepted rows of a downloaded shard; commits `_work/score/<shard>.parquet`."""
        start = time.time()
        out.remove([spec.score_file, marker(SCORE, spec)])
        if accepted:
            table = out.read_parquet(spec.accepted_file, columns=["key", "jpg", "caption"])
            scores = self.scores(table.column("jpg").to_pylist(), table.column("caption").to_pylist())
            out.write_parquet(
                spec.score_file,
                pa.table({"key": table.column("key"), "score": pa.array(scores)}, schema=SCORE_SCHEMA),
                row_group_rows=65_536,
            )
        stats = {"shard": spec.name, "rows": accepted, "scored": accepted, "duration_s": round(time.time() - start, 3)}
        out.write_json(marker(SCORE, spec), stats)
        return stats
