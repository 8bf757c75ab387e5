"""The row filters of `data.filters`: plain functions of a caption or an image size.

Captions are checked before anything is downloaded (a row whose caption will be rejected costs no
bandwidth); image size and aspect ratio are checked on the image header, before decoding. The
CLIP-score cut and dedup need every shard and live in `clip_score.py` and `dedup.py`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from pipeline.config import FiltersConfig
from pipeline.language import LanguageFilter
from pipeline.reasons import FILTER, Rejection


class RowFilters:
    """The row filters of `data.filters`; `column_cuts` are the committed top-fraction cuts of
    `filters.columns` (`column_filters.compute_cuts`), needed when such a rule exists."""

    def __init__(self, filters: FiltersConfig, column_cuts: Optional[dict[str, float]] = None):
        from pipeline.column_filters import ColumnFilters  # it uses clip_score_cut, below

        self.f = filters
        self.columns = ColumnFilters(filters.columns, column_cuts) if filters.columns else None
        self.language = LanguageFilter(filters.language) if filters.language is not None else None

    def caption(self, caption: Optional[str], caption_ok: bool) -> Optional[Rejection]:
        """Why this caption is rejected, or None. `caption_ok`: it was a valid UTF-8 string."""
        f = self.f
        if not caption_ok:
            if f.drop_non_text_captions:
                shown = "missing" if caption is None else f"not a valid UTF-8 string: {caption[:80]!r}"
                return Rejection(FILTER, "caption_not_text", f"caption is {shown}")
            caption = caption or ""
        text = caption.strip()
        if f.drop_empty_captions and not text:
            return Rejection(
                FILTER, "caption_empty", "caption is empty" if not caption else "caption is only whitespace"
            )
        chars = len(text)
        if f.min_caption_chars is not None and chars < f.min_caption_chars:
            return Rejection(
                FILTER, "caption_too_short", f"{chars} characters < min_caption_chars {f.min_caption_chars}"
            )
        if f.max_caption_chars is not None and chars > f.max_caption_chars:
            return Rejection(
                FILTER, "caption_too_long", f"{chars} characters > max_caption_chars {f.max_caption_chars}"
            )
        if f.min_caption_words is not None or f.max_caption_words is not None:
            words = len(text.split())
            if f.min_caption_words is not None and words < f.min_caption_words:
                return Rejection(
                    FILTER, "caption_too_few_words", f"{words} words < min_caption_words {f.min_caption_words}"
                )
            if f.max_caption_words is not None and words > f.max_caption_words:
                return Rejection(
                    FILTER, "caption_too_many_words", f"{words} words > max_caption_words {f.max_caption_words}"
                )
        if self.language is not None:
            return self.language.rejection(text)
        return None

    def image(self, width: int, height: int) -> Optional[Rejection]:
        """Why an image of this original size is rejected, or None."""
        f = self.f
        short, long = min(width, height), max(width, height)
        if f.min_image_side is not None and short < f.min_image_side:
            return Rejection(FILTER, "too_small", f"{width}x{height}: short side < min_image_side {f.min_image_side}")
        if f.max_aspect_ratio is not None and long / short > f.max_aspect_ratio:
            return Rejection(
                FILTER,
                "aspect_ratio",
                f"{width}x{height}: aspect ratio {long / short:.2f} > max_aspect_ratio {f.max_aspect_ratio:g}",
            )
        return None


def clip_score_cut(scores: np.ndarray, threshold: Optional[float], top_fraction: Optional[float]) -> float:
    """The score a row needs to be kept (scores >= cut are kept).

    `threshold` first removes rows below it; `top_fraction` then keeps the best `ceil(f * n)` of the
    rows left (rows tied with the last kept score are kept too, so the result never depends on
    order). With no rows left the cut is +inf.
    """
    scores = np.asarray(scores, dtype=np.float64)
    cut = -np.inf if threshold is None else float(threshold)
    if top_fraction is not None:
        left = np.sort(scores[scores >= cut])[::-1]
        if len(left) == 0:
            return float("inf")
        keep = int(np.ceil(top_fraction * len(left)))
        cut = max(cut, float(left[keep - 1])) if keep > 0 else float("inf")
    return float(cut)
