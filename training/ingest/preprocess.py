"""Preprocessing one batch of shard rows into model inputs (pure, no Ray): decode, square crop,
resize, tokenize.

Training crops are CLIP's augmentation: a random square covering a fraction in
[crop_scale_min, 1] of the largest square's area, seeded by (train.seed, pass, key), so a resumed
run sees the same crops as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

KEY_COL, CAPTION_COL, IMAGE_COL = "key", "caption", "jpg"
REQUIRED_COLUMNS = (KEY_COL, CAPTION_COL, IMAGE_COL)
# Status codes of the `status` column (0 = usable); the names are the reasons reported in metrics.
# `no_caption` and `truncated` come from WebDataset shards (a sample without `.txt`, a tar cut short).
REJECT_REASONS = ("ok", "not_an_image", "no_image", "no_caption", "truncated")


# ------------------------------------------------------------------------------------ preprocess
@dataclass(frozen=True)
class PreprocessSettings:
    image_size: int
    context_length: int = 77
    train: bool = True
    seed: int = 0
    crop_scale_min: float = 0.9
    decoder: str = "cv2"

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if self.decoder not in ("cv2", "pil"):
            raise ValueError(f"decoder {self.decoder!r}: expected 'cv2' (OpenCV) or 'pil' (Pillow)")


def crop_box(key: str, width: int, height: int, settings: PreprocessSettings, pass_index: int) -> tuple[int, int, int]:
    """(x, y, side) of the training crop for one row: CLIP's augmentation, a random square covering
    a fraction in [crop_scale_min, 1] of the largest square's area, at a random place; the randomness
    is a hash of (seed, pass, key), so it differs between passes and is the same after a resume.
    (Evaluation rows take CLIP's eval transform instead: `training.model.eval_pixels`.)
    """
    short = min(width, height)
    digest = hashlib.blake2b(f"{settings.seed}/{pass_index}/{key}".encode(), digest_size=12).digest()
    u = [int.from_bytes(digest[i : i + 4], "little") / 2**32 for i in (0, 4, 8)]
    area = settings.crop_scale_min + (1.0 - settings.crop_scale_min) * u[0]
    side = max(1, min(short, int(round(short * area**0.5))))
    return int(u[1] * (width - side + 1)), int(u[2] * (height - side + 1)), side


class Preprocess:
    """One batch of shard rows -> model inputs (pure; no Ray).

    Training rows get the random square crop of `crop_box` (decoded by `settings.decoder`);
    evaluation rows (`settings.train` false, held-out validation) get CLIP's eval transform, the one
    evaluation and the CLIP-score filter use (`training.model.eval_pixels`).

    In: `key`, `caption`, `jpg` (encoded bytes) columns. Out: `image` uint8 [N, S, S, 3] (RGB),
    `tokens` int32 [N, context_length], `status` uint8 [N] (0 = usable, else an index into
    REJECT_REASONS), `key`. Rows are never dropped here, so positions stay exact; a row that fails
    to decode comes out black with its status set, and the Rebatcher drops and counts it.
    """

    def __init__(self, settings: PreprocessSettings):
        self.settings = settings
        if settings.decoder == "cv2":
            import cv2

            cv2.setNumThreads(1)  # one image per core: threads inside OpenCV only contend
            self._cv2 = cv2

    def __call__(self, batch: dict[str, Any], pass_index: int = 0) -> dict[str, np.ndarray]:
        from training.tokenizer import tokenize

        keys, captions, blobs = batch[KEY_COL], batch[CAPTION_COL], batch[IMAGE_COL]
        n, size = len(keys), self.settings.image_size
        images = np.zeros((n, size, size, 3), dtype=np.uint8)
        status = np.zeros(n, dtype=np.uint8)
        for i in range(n):
            status[i] = self._image(blobs[i], str(keys[i]), images[i], pass_index)
        texts = ["" if c is None else str(c) for c in captions]
        tokens = tokenize(texts, context_length=self.settings.context_length).numpy().astype(np.int32)
        return {"image": images, "tokens": tokens, "status": status, KEY_COL: np.asarray(keys, dtype=object)}

    def _image(self, blob: Any, key: str, out: np.ndarray, pass_index: int) -> int:
        if blob is None or len(blob) == 0:
            return REJECT_REASONS.index("no_image")
        try:
            if not self.settings.train:
                from training.model import eval_pixels

                out[...] = eval_pixels(bytes(blob), self.settings.image_size)
                return 0
            if self.settings.decoder == "cv2":
                return self._cv2_image(blob, key, out, pass_index)
            return self._pil_image(blob, key, out, pass_index)
        except Exception:  # noqa: BLE001 - any decoder failure is a rejected row, counted by reason
            return REJECT_REASONS.index("not_an_image")

    def _cv2_image(self, blob: Any, key: str, out: np.ndarray, pass_index: int) -> int:
        cv2 = self._cv2
        img = cv2.imdecode(np.frombuffer(blob, dtype=np.uint8), cv2.IMREAD_COLOR)
        if img is None or img.size == 0:
            return REJECT_REASONS.index("not_an_image")
        height, width = img.shape[:2]
        x, y, side = crop_box(key, width, height, self.settings, pass_index)
        crop = img[y : y + side, x : x + side]
        size = self.settings.image_size
        if side != size:
            interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
            crop = cv2.resize(crop, (size, size), interpolation=interp)
        cv2.cvtColor(crop, cv2.COLOR_BGR2RGB, dst=out)
        return 0

    def _pil_image(self, blob: Any, key: str, out: np.ndarray, pass_index: int) -> int:
        import io

        from PIL import Image

        with Image.open(io.BytesIO(blob)) as img:
            size = self.settings.image_size
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when much larger
            img = img.convert("RGB")
            x, y, side = crop_box(key, img.width, img.height, self.settings, pass_index)
            img = img.resize((size, size), Image.BICUBIC, box=(x, y, x + side, y + side))
            out[...] = np.asarray(img)
        return 0
