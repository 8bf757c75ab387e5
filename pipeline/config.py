"""The `data` section of the job config: what the pipeline reads, how it downloads, what it keeps."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from storage import StorageConfig

EXPECTED_HASH = "expected_hash"  # the staged input's copy of data.verify_hash.column
BLUR_BOXES = "blur_boxes"  # the staged input's copy of data.bbox_col
LOCAL_IMAGE = "local_image"  # the staged input's image bytes (WebDataset input): used instead of a download


def column_copy(name: str) -> str:
    """The staged input's copy of input column `name`, read for a `data.filters.columns` rule."""
    return f"filter_column:{name}"


# Any 8-bit image at the default data.max_pixels fits (89,478,485 x 4 bytes = 358 MB); 16-bit
# images outside PNG (OpenCV holds them as 16-bit) get about half as many pixels.
DEFAULT_MAX_DECODED_BYTES = 384 * 2**20

INTERPOLATIONS = Literal["nearest", "linear", "bilinear", "cubic", "bicubic", "area", "lanczos", "lanczos4"]


class ClipScoreFilterConfig(BaseModel):
    """DataComp's CLIP-score filter: embed image and caption with a trained checkpoint.

    `threshold` drops pairs whose cosine similarity is below it; `top_fraction` then keeps the best
    fraction of what is left (DataComp's best baseline keeps the top 30%). Set one or both.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="run dir, final/ dir or state-dict file of a CLIP checkpoint")
    model_name: Optional[str] = Field(None, description="architecture when the checkpoint carries no config")
    threshold: Optional[float] = Field(None, ge=-1.0, le=1.0, description="keep pairs with cosine >= threshold")
    top_fraction: Optional[float] = Field(None, gt=0, le=1, description="keep this best fraction")
    batch_size: PositiveInt = 256
    num_actors: PositiveInt = Field(1, description="scoring actors (each loads the model once)")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per scoring actor (0: CPU)")

    @model_validator(mode="after")
    def _one_rule(self) -> "ClipScoreFilterConfig":
        if self.threshold is None and self.top_fraction is None:
            raise ValueError("set data.filters.clip_score.threshold, .top_fraction or both")
        return self


class ColumnRule(BaseModel):
    """One `data.filters.columns` rule over an input column (pipeline/column_filters.py): either
    `{column, op, value}` or `{column, top_fraction}` (keep the best fraction of the whole input)."""

    model_config = ConfigDict(extra="forbid")

    column: str = Field(min_length=1, description="an input column (need not be in data.extra_cols)")
    op: Optional[Literal[">=", "<=", "==", "!=", "in", "not_in"]] = None
    value: Any = Field(None, description="a number or string; a list for in / not_in")
    top_fraction: Optional[float] = Field(None, gt=0, le=1, description="keep this best fraction by the column")

    @model_validator(mode="after")
    def _one_form(self) -> "ColumnRule":
        where = f"data.filters.columns rule on {self.column!r}"
        if (self.op is None) == (self.top_fraction is None):
            raise ValueError(f"{where}: give either op and value, or top_fraction")
        if self.op is not None:
            if self.value is None:
                raise ValueError(f"{where}: op {self.op!r} needs a value")
            if self.op in ("in", "not_in") and not isinstance(self.value, list):
                raise ValueError(f"{where}: op {self.op!r} needs a list value, got {self.value!r}")
            if self.op not in ("in", "not_in") and not isinstance(self.value, (int, float, str)):
                raise ValueError(f"{where}: op {self.op!r} needs a number or string value, got {self.value!r}")
        elif self.value is not None:
            raise ValueError(f"{where}: top_fraction takes no value")
        return self


class LanguageFilterConfig(BaseModel):
    """`data.filters.language` (pipeline/language.py): keep a caption when its detected language is
    one of `keep` (ISO 639-1 codes) with at least `min_confidence`. Needs the optional extra
    lingua-language-detector; without it the config is refused before any work."""

    model_config = ConfigDict(extra="forbid")

    keep: list[str] = Field(min_length=1, description="ISO 639-1 codes to keep, e.g. [en] (DataComp's basic filter)")
    min_confidence: float = Field(0.0, ge=0.0, le=1.0, description="the kept language's confidence, 0..1")
    candidates: Optional[list[str]] = Field(
        None,
        min_length=1,
        description="ISO 639-1 codes to tell apart (default: every language lingua knows, ~1 GB per actor)",
    )

    @model_validator(mode="after")
    def _known_codes(self) -> "LanguageFilterConfig":
        from pipeline.language import lingua_language

        for key in ("keep", "candidates"):
            for code in getattr(self, key) or ():
                try:
                    lingua_language(code)
                except (ValueError, ImportError) as e:
                    raise ValueError(f"data.filters.language.{key}: {e}") from None
        return self


class FiltersConfig(BaseModel):
    """Each filter is off when its value is None/False."""

    model_config = ConfigDict(extra="forbid")

    drop_empty_captions: bool = Field(True, description="reject captions that are empty or only whitespace")
    drop_non_text_captions: bool = Field(
        True, description="reject captions that are missing, not strings, or not valid UTF-8"
    )
    min_caption_chars: Optional[int] = Field(None, ge=0)
    max_caption_chars: Optional[int] = Field(None, ge=1)
    min_caption_words: Optional[int] = Field(None, ge=0)
    max_caption_words: Optional[int] = Field(None, ge=1)
    min_image_side: Optional[int] = Field(None, ge=1, description="on the original image, pixels")
    max_aspect_ratio: Optional[float] = Field(None, ge=1.0, description="long side / short side of the original")
    dedup_sha256: bool = Field(False, description="drop all but the first row (by key) with the same image bytes")
    dedup_url_caption: bool = Field(
        False, description="drop all but the first row (by key) with the same url and caption, before downloading"
    )
    clip_score: Optional[ClipScoreFilterConfig] = None
    columns: list[ColumnRule] = Field(
        default_factory=list,
        description="rules over input columns ({column, op, value} or {column, top_fraction}), before download",
    )
    language: Optional[LanguageFilterConfig] = Field(
        None, description="keep captions in these languages ({keep: [en]}), before download"
    )

    @model_validator(mode="after")
    def _ranges(self) -> "FiltersConfig":
        for low, high in (("min_caption_chars", "max_caption_chars"), ("min_caption_words", "max_caption_words")):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"data.filters.{low} ({lo}) is larger than data.filters.{high} ({hi})")
        return self

    @property
    def needs_global_pass(self) -> bool:
        """Filters that need every downloaded shard before they can decide (image dedup, CLIP score).
        The (url, caption) dedup is decided before the download, from the input alone."""
        return self.dedup_sha256 or self.clip_score is not None


class VerifyHashConfig(BaseModel):
    """img2dataset's `verify_hash`: an input column holds each image's expected hash (hex) of the
    downloaded bytes; an image whose bytes hash to anything else, or a row without an expected
    hash, is rejected as `download/hash_mismatch` (DataComp pools carry a `sha256` column)."""

    model_config = ConfigDict(extra="forbid")

    column: str = Field(description="input column with the expected hex digest of the downloaded image")
    algorithm: Literal["sha256", "sha512", "md5"] = "sha256"

    @model_validator(mode="before")
    @classmethod
    def _img2dataset_form(cls, value: Any) -> Any:
        """img2dataset's `[column, algorithm]` pair is accepted as well."""
        if isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise ValueError(f"give [column, algorithm] or {{column: ..., algorithm: ...}}, got {value!r}")
            return {"column": value[0], "algorithm": value[1]}
        return value


class DataConfig(StorageConfig):
    """The `data` section; its storage keys (`storage_options`, `s3_endpoint_url`, `s3_region`) serve
    `data.input` and `data.output`."""

    model_config = ConfigDict(extra="forbid")

    # --- what to read
    input: Optional[str] = Field(None, description="file, folder or glob; local or fsspec URL")
    input_format: Optional[Literal["parquet", "csv", "tsv", "json", "jsonl", "webdataset"]] = Field(
        None,
        description="inferred from each file's extension when absent (.gz is read transparently; .tar: "
        "WebDataset shards, whose images are used as they are, without a download)",
    )
    columns: Optional[list[str]] = Field(
        None, description="column names of header-less csv/tsv files, in order (CC3M: [caption, url])"
    )
    url_col: str = "url"
    caption_col: str = "caption"
    extra_cols: list[str] = Field(default_factory=list, description="input columns carried to shards")
    bbox_col: Optional[str] = Field(
        None,
        description="input column of boxes to blur, each [x_min, y_min, x_max, y_max] relative to the "
        "image (img2dataset's bbox_col; DataComp pools: face_bboxes)",
    )
    # --- where to write
    output: Optional[str] = Field(None, description="output folder; local or s3://")
    rows_per_shard: PositiveInt = Field(10_000, le=1_000_000, description="input rows per shard (one commit unit)")
    output_format: Literal["parquet", "webdataset"] = Field(
        "parquet",
        description="shards/ as Parquet (key, url, caption, jpg, ...) or WebDataset tars in img2dataset's layout "
        "({key}.jpg, {key}.txt, {key}.json; {n}_stats.json beside {n}.tar)",
    )
    # --- image processing (img2dataset's Resizer options)
    image_size: PositiveInt = 256
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "border"
    resize_only_if_bigger: bool = False
    upscale_interpolation: INTERPOLATIONS = "lanczos"
    downscale_interpolation: INTERPOLATIONS = "area"
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=0, le=100, description="jpg/webp quality; png compression 0-9")
    min_image_size: int = Field(0, ge=0, description="img2dataset's min_image_size, pixels")
    max_image_area: Optional[float] = Field(None, gt=0, description="img2dataset's max_image_area")
    max_pixels: PositiveInt = Field(89_478_485, description="decompression-bomb cap on decoded pixels")
    max_decoded_bytes: PositiveInt = Field(
        DEFAULT_MAX_DECODED_BYTES,
        description="cap on one decoded image in bytes (width x height x the bytes per pixel its decoder holds, "
        "from the header; JPEGs at their reduced DCT scale), checked before decoding; the 8-bit output (at most "
        "3 bytes per pixel) comes on top",
    )
    fast_jpeg_decode: bool = Field(
        True, description="decode JPEGs at a reduced DCT scale when the target is at most half the size"
    )
    # --- download
    allow_private_addresses: bool = False
    local_root: Optional[str] = Field(
        None,
        description="a local folder whose files rows may name (relative paths or file:// URLs) instead of "
        "web URLs; nothing outside it is read (pipeline/local_files.py)",
    )
    dns_error_cache_s: float = Field(
        5.0,
        ge=0.0,
        le=60.0,
        description="a host name that failed to resolve is answered from the cache this long, then asked "
        "again (resolved addresses and refused hosts are cached for 300 s)",
    )
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"],
        description="X-Robots-Tag directives that opt an image out (img2dataset's defaults)",
    )
    user_agent_token: Optional[str] = Field(
        "clipray", description="token matched against 'X-Robots-Tag: <token>: ...' directives"
    )
    timeout_s: PositiveFloat = Field(
        10.0, description="per attempt: name resolution, connect, every redirect hop and the whole response"
    )
    retries: int = Field(
        2, ge=0, description="extra attempts after a timeout, connection error, DNS failure, 429 or 5xx"
    )
    retry_backoff_s: float = Field(0.5, ge=0.0, description="first retry waits this long, then doubles")
    max_retry_after_s: float = Field(
        30.0,
        ge=0.0,
        description="a 429/503's Retry-After is waited up to this long before the retry; a server that "
        "asks for longer is not retried",
    )
    max_redirects: int = Field(5, ge=0)
    max_response_bytes: PositiveInt = 32 * 1024 * 1024
    user_agent: str = "clipray/0.1 (+https://github.com/clipray/clipray)"
    verify_hash: Optional[VerifyHashConfig] = Field(
        None, description="reject images whose downloaded bytes do not hash to the input column's value"
    )
    # --- parallelism
    num_download_actors: Optional[PositiveInt] = Field(
        None, description="default: one per CPU of the cluster, at most one per shard"
    )
    max_in_flight: PositiveInt = Field(
        512,
        description="rows per download actor between the start of their request and the end of their "
        "decode: requests in flight (one network thread, libcurl) plus bodies waiting for a decoder",
    )
    max_connections_per_host: PositiveInt = Field(
        8, description="requests at a time to one host (name and port), per download actor"
    )
    skip_host_after_failures: int = Field(
        8,
        ge=0,
        validation_alias=AliasChoices("skip_host_after_failures", "skip_host_after_timeouts"),  # its name until 12-2026
        description="a host whose last this many requests all failed without an answer (timed out, or the "
        "connection refused or reset before a response) is skipped for data.skip_host_for_s: its rows end at "
        "once with that reason instead of queueing for its slots (0: never)",
    )
    skip_host_for_s: PositiveFloat = Field(60.0, description="how long a host that stopped answering is skipped")
    reuse_connections: bool = Field(
        True,
        description="keep-alive: send a host's next request on an idle connection with nothing waiting on it "
        "(false: a new connection per request, so no host can answer one of its URLs with a response it "
        "held back for another; ~0.2 ms more CPU per image, a TLS handshake per https image)",
    )
    threads_per_actor: PositiveInt = Field(
        2,
        description="decoder threads per download actor: check, decode, resize, encode and hash the "
        "downloaded images (the downloads themselves are on the network thread, data.max_in_flight)",
    )
    progress: bool = Field(True, description="progress bars and the closing summary on stdout")
    warn_error_rate: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="warn when more than this share of a shard's rows fail to download or decode, naming "
        "the top reasons (1: never warn)",
    )
    retry_rejects: bool = Field(
        False,
        description="rerun, in place, only the rows of the finished run in data.output that were rejected "
        "for a transient reason (timeout, connection_error, dns_error, http_429, http_5xx)",
    )
    filters: FiltersConfig = Field(default_factory=FiltersConfig)

    @property
    def needs_global_pass(self) -> bool:
        """Accepted rows wait in `_work/` for a step over the whole run (image dedup, CLIP score) or
        for the tar writer (WebDataset output) before they become `shards/`."""
        return self.filters.needs_global_pass or self.output_format == "webdataset"

    @model_validator(mode="after")
    def _consistent(self) -> "DataConfig":
        if self.encode_format == "png" and self.encode_quality > 9:
            raise ValueError(f"data.encode_quality = {self.encode_quality}: for png it is the compression level 0-9")
        if self.retry_rejects and self.filters.needs_global_pass:
            raise ValueError(
                "data.retry_rejects cannot be combined with data.filters.dedup_sha256 or data.filters.clip_score: "
                "a retried image would change decisions made over the whole run; rerun the rows in a new "
                "data.output instead"
            )
        if self.retry_rejects and self.output_format == "webdataset":
            raise ValueError(
                "data.retry_rejects cannot be combined with data.output_format: webdataset yet (the retry merges "
                "rows into Parquet shards); retry with output_format parquet, or rerun the rows in a new data.output"
            )
        if self.local_root is not None:
            import os

            if "://" in self.local_root and not self.local_root.startswith("file://"):
                raise ValueError(f"data.local_root {self.local_root!r} must be a local folder (no s3:// etc.)")
            root = self.local_root[len("file://") :] if self.local_root.startswith("file://") else self.local_root
            if not os.path.isdir(root):
                raise ValueError(f"data.local_root {self.local_root!r} is not a folder")
            self.local_root = os.path.abspath(root)
        if self.columns is not None:
            if len(set(self.columns)) != len(self.columns) or not all(self.columns):
                raise ValueError(f"data.columns {self.columns} must be distinct non-empty names")
        reserved = {
            "key",
            "url",
            "caption",
            "jpg",
            "width",
            "height",
            "original_width",
            "original_height",
            "sha256",
            "stage",
            "reason",
            "detail",
            "caption_ok",
            "source_error",
            EXPECTED_HASH,
            BLUR_BOXES,
        }
        clash = sorted(set(self.extra_cols) & (reserved | {self.url_col, self.caption_col}))
        if clash:
            raise ValueError(
                f"data.extra_cols {clash} clash with the pipeline's output or internal columns {sorted(reserved)}"
            )
        return self
