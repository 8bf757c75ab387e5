"""Download, check, filter, dedup and shard image-text pairs into Parquet on Ray Data.

Entry point: `pipeline.run.run_pipeline(data: pipeline.config.DataConfig) -> manifest dict`
(`clipray pipeline` / `python -m pipeline`). See docs/pipeline.md for the phases and outputs.
"""
