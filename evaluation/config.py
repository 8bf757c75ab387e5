"""The `eval` section of the job config."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from storage import StorageConfig


class EvalConfig(StorageConfig):
    """The `eval` section; its storage keys (`storage_options`, `s3_endpoint_url`, `s3_region`) serve the
    data sets, the model, the classifier cache and the outputs."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = Field(
        None, description="run dir, final/ dir, open_clip or Hugging Face model dir, or state-dict file"
    )
    model_name: Optional[str] = Field(None, description="architecture when the checkpoint has no config")
    task: Literal["zeroshot", "retrieval", "linear_probe"] = "zeroshot"
    dataset: Optional[str] = Field(None, description="ImageFolder tree, CSV/Parquet table or pipeline shards")
    dataset_name: Optional[str] = None
    train_dataset: Optional[str] = Field(None, description="linear probe's training split")
    val_dataset: Optional[str] = Field(None, description="linear probe's validation split (default: split train)")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of train held out to choose C")
    label_col: str = "label"
    caption_col: str = "caption"
    image_col: str = "jpg"
    image_root: Optional[str] = Field(
        None, description="folder or URL prefix a table's image paths must lie under (default: the table's folder)"
    )
    allow_external_image_paths: bool = Field(
        False, description="take a table's image paths as written (absolute, ../, URLs): trusted tables only"
    )
    classnames: Optional[str] = Field(
        None, description="imagenet|cifar10|cifar100 or a file with one class name per line"
    )
    templates: Optional[str] = Field(
        None, description="imagenet|cifar10|cifar100|simple or a file with one prompt template per line ({c} = class)"
    )
    output: Optional[str] = Field(None, description="results JSON file (with eval.suite: the results folder)")
    suite: Optional[str] = Field(
        None, description="task list to run (DataComp's tasklist.yml format, or `datacomp` for its 38 tasks)"
    )
    data_root: Optional[str] = Field(None, description="folder holding the suite's data sets (wds_<task>_test, ...)")
    batch_size: PositiveInt = 256
    recall_k: list[PositiveInt] = Field(default_factory=lambda: [1, 5, 10])
    use_gpu: bool = False
    dump_predictions: bool = False
    report: bool = Field(True, description="write a Markdown summary (and a confusion-matrix PNG) beside output")

    engine: Literal["auto", "local", "ray"] = Field(
        "auto", description="auto: Ray Data actors when Ray is up and the set has >= ray_min_rows images"
    )
    ray_min_rows: PositiveInt = 10_000
    num_actors: Optional[PositiveInt] = Field(None, description="embedding actors (default: autoscale to the cluster)")
    cpus_per_actor: PositiveFloat = 1.0
    decode_threads: int = Field(4, ge=0, description="threads decoding images in each embedding worker")
    precision: Literal["fp32", "amp_bf16", "amp_fp16"] = "fp32"
    max_samples: Optional[PositiveInt] = Field(None, description="evaluate the first N images only")
    seed: int = 0

    probe_c_range: tuple[PositiveFloat, PositiveFloat] = (1e-6, 1e6)
    probe_steps_per_decade: PositiveInt = 8
    probe_max_iter: PositiveInt = 1000
    retrieval_block_size: PositiveInt = 2048
    classifier_cache: Optional[str] = Field(
        None, description="folder caching zero-shot classifiers (local or fsspec URL)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> "EvalConfig":
        low, high = self.probe_c_range
        if not low < high:
            raise ValueError(f"eval.probe_c_range {list(self.probe_c_range)} must be [low, high] with low < high")
        if self.image_root is not None and self.allow_external_image_paths:
            raise ValueError(
                f"eval.image_root {self.image_root!r} and eval.allow_external_image_paths: true exclude "
                "each other (the second accepts any path, so the root would check nothing); keep one"
            )
        if self.image_root is not None and ("::" in self.image_root or not self.image_root.strip()):
            raise ValueError(
                f"eval.image_root {self.image_root!r} must be one folder or URL prefix "
                "(e.g. /data/images or s3://bucket/images), not empty and not an fsspec chain (::)"
            )
        if self.suite is not None:
            missing = [f"eval.{k}" for k in ("data_root", "output") if not getattr(self, k)]
            if missing:
                raise ValueError(
                    f"eval.suite {self.suite!r} needs {' and '.join(missing)} "
                    "(the folder holding the data sets; the results folder)"
                )
        return self
