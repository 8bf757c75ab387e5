"""The `data` section of the job config: what the pipeline reads, how it downloads, what it keeps."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PositiveInt


class ClipScoreFilterConfig(BaseModel):
    """DataComp's CLIP-score filter: embed image and caption with a trained checkpoint."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="run dir, final/ dir or state-dict file of a CLIP checkpoint")
    threshold: Optional[float] = Field(None, description="keep pairs with cosine >= threshold")
    top_fraction: Optional[float] = Field(None, gt=0, le=1, description="keep this best fraction")
    batch_size: PositiveInt = 256


class FiltersConfig(BaseModel):
    """Each filter is off when its value is None/False."""

    model_config = ConfigDict(extra="forbid")

    min_caption_chars: Optional[int] = Field(None, ge=0)
    max_caption_chars: Optional[int] = Field(None, ge=1)
    min_caption_words: Optional[int] = Field(None, ge=0)
    max_caption_words: Optional[int] = Field(None, ge=1)
    min_image_side: Optional[int] = Field(None, ge=1, description="on the original image, pixels")
    max_aspect_ratio: Optional[float] = Field(None, ge=1.0)
    dedup_sha256: bool = False
    dedup_url_caption: bool = False
    clip_score: Optional[ClipScoreFilterConfig] = None


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: Optional[str] = Field(None, description="file, folder or glob; local or fsspec URL")
    input_format: Optional[Literal["parquet", "csv", "tsv", "json", "jsonl"]] = None
    url_col: str = "url"
    caption_col: str = "caption"
    extra_cols: list[str] = Field(default_factory=list, description="input columns carried to shards")
    output: Optional[str] = Field(None, description="output folder; local or s3://")
    image_size: PositiveInt = 256
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "border"
    resize_only_if_bigger: bool = False
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100)
    min_image_size: int = Field(0, ge=0, description="img2dataset's min_image_size, pixels")
    max_image_area: Optional[float] = Field(None, gt=0, description="img2dataset's max_image_area")
    max_pixels: PositiveInt = Field(89_478_485, description="decompression-bomb cap on decoded pixels")
    allow_private_addresses: bool = False
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"],
        description="X-Robots-Tag directives that opt an image out (img2dataset's defaults)",
    )
    timeout_s: float = Field(10.0, gt=0)
    retries: int = Field(2, ge=0)
    max_redirects: int = Field(5, ge=0)
    max_response_bytes: PositiveInt = 32 * 1024 * 1024
    user_agent: str = "clipray/0.1 (+https://github.com/clipray/clipray)"
    num_download_actors: Optional[PositiveInt] = Field(None, description="default: one per CPU")
    threads_per_actor: PositiveInt = 16
    rows_per_shard: PositiveInt = 10_000
    batch_size: PositiveInt = 256
    s3_endpoint_url: Optional[str] = None
    filters: FiltersConfig = Field(default_factory=FiltersConfig)
