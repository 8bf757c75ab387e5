"""The progress output: a warning for each shard whose rows fail to download or decode more often
than `data.warn_error_rate`, naming the top reasons."""

from __future__ import annotations

import json
import logging

from pipeline.config import DataConfig
from pipeline.progress import MAX_SHARD_WARNINGS, error_rate_warning, progress


class _Results:
    """Stands in for a Ray Data result: rows of per-shard stats JSON."""

    def __init__(self, stats: list[dict]):
        self.stats = stats

    def iter_rows(self):
        for s in self.stats:
            yield {"stats": json.dumps(s)}


def _shard(name: str, rows: int, accepted: int, reasons: dict) -> dict:
    return {"shard": name, "rows": rows, "accepted": accepted, "rejected": rows - accepted, "reasons": reasons}


def test_the_warning_counts_download_and_decode_failures_and_names_the_top_reasons():
    stats = _shard("00003", 10, 1, {"timeout": 4, "dns_error": 2, "not_an_image": 1, "caption_empty": 2})
    message = error_rate_warning("00003", stats, 0.5)
    assert message == (
        "shard 00003: 7 of 10 rows (70%) failed to download or decode (top reasons: timeout 4, dns_error 2, "
        "not_an_image 1), above data.warn_error_rate=0.5"
    )
    assert error_rate_warning("00003", stats, 0.7) is None  # 70% does not pass 0.7
    # filter and dedup rejections are choices, not errors
    filtered = _shard("00004", 10, 1, {"caption_too_short": 5, "duplicate": 3, "http_404": 1})
    assert error_rate_warning("00004", filtered, 0.5) is None
    assert "http_503 6" in error_rate_warning("00005", _shard("00005", 10, 4, {"http_503": 6}), 0.5)


def test_a_failing_shard_is_warned_of_in_the_progress_output_and_the_log(capsys, caplog):
    shards = [
        _shard("00000", 8, 8, {}),
        _shard("00001", 8, 2, {"connection_error": 5, "http_404": 1}),
        _shard("00002", 8, 5, {"timeout": 3}),
    ]
    with caplog.at_level(logging.WARNING, logger="clipray.pipeline"):
        seen = list(progress(DataConfig(progress=True), _Results(shards), "download", 24, counts=lambda s: s))
    assert seen == shards
    out = capsys.readouterr().out
    assert out.count("warning: shard") == 1
    assert "warning: shard 00001: 6 of 8 rows (75%) failed to download or decode" in out
    assert "connection_error 5, http_404 1" in out
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        error_rate_warning("00001", shards[1], 0.5)
    ]


def test_without_progress_the_warning_goes_to_the_log_only_and_stops_after_a_limit(capsys, caplog):
    failing = [_shard(f"{i:05d}", 4, 0, {"dns_error": 4}) for i in range(MAX_SHARD_WARNINGS + 5)]
    data = DataConfig(progress=False, warn_error_rate=0.9)
    with caplog.at_level(logging.WARNING, logger="clipray.pipeline"):
        list(progress(data, _Results(failing), "retry", 4 * len(failing), counts=lambda s: s))
    assert capsys.readouterr().out == ""
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == MAX_SHARD_WARNINGS + 1
    assert messages[0].startswith("shard 00000: 4 of 4 rows (100%)")
    assert messages[-1] == "retry: further shards above data.warn_error_rate are not reported"


def test_warn_error_rate_is_a_share_of_rows():
    import pytest

    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match="warn_error_rate"):
            DataConfig(warn_error_rate=bad)
