"""The `data` section holds only keys the pipeline reads (no Ray)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from clipray.config import ConfigError, validate_config
from pipeline.config import DataConfig


def test_data_batch_size_is_refused_by_name():
    """The global pass works a whole shard per task (`rows_per_shard` rows) and the CLIP-score batch
    is `data.filters.clip_score.batch_size`: a `data.batch_size` would change nothing, so it is an
    unknown key rather than a silent no-op."""
    assert "batch_size" not in DataConfig.model_fields
    with pytest.raises(ValidationError, match="batch_size"):
        DataConfig(batch_size=256)
    with pytest.raises(ConfigError, match=r"unknown key 'data\.batch_size': it was removed: nothing read it") as err:
        validate_config({"data": {"batch_size": 256}})
    assert "did you mean" not in str(err.value)  # not pointed at data.image_size
    clip = validate_config(
        {"data": {"filters": {"clip_score": {"model": "runs/x", "threshold": 0.2, "batch_size": 64}}}}
    )
    assert clip.data.filters.clip_score.batch_size == 64
