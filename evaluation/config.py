"""The `eval` section of the job config."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PositiveInt


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = Field(None, description="run dir, final/ dir or state-dict file")
    model_name: Optional[str] = Field(None, description="architecture when the checkpoint has no config")
    task: Literal["zeroshot", "retrieval", "linear_probe"] = "zeroshot"
    dataset: Optional[str] = Field(None, description="ImageFolder tree, CSV/Parquet table or pipeline shards")
    dataset_name: Optional[str] = None
    train_dataset: Optional[str] = Field(None, description="linear probe's training split")
    label_col: str = "label"
    caption_col: str = "caption"
    image_col: str = "jpg"
    classnames: Optional[str] = Field(None, description="file with one class name per line")
    templates: Optional[str] = Field(None, description="file with one prompt template per line ({c} = class)")
    output: Optional[str] = Field(None, description="results JSON file")
    batch_size: PositiveInt = 256
    recall_k: list[PositiveInt] = Field(default_factory=lambda: [1, 5, 10])
    use_gpu: bool = False
    dump_predictions: bool = False
