"""`data.filters.columns`: rules over the input's own columns, decided before any download. The
top-fraction cut is the one a numpy computation on the input gives, and a dropped row is never
requested from the (loopback) server."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from pipeline.column_filters import ColumnFilters
from pipeline.config import DataConfig, FiltersConfig, column_copy
from tests.support.http_server import HTTPTestServer, jpeg_bytes


def test_column_rules_are_typed_and_a_bad_rule_names_its_column():
    FiltersConfig(columns=[{"column": "NSFW", "op": "in", "value": ["UNLIKELY"]}, {"column": "s", "top_fraction": 0.3}])
    for bad, message in (
        ({"column": "s", "op": ">=", "value": 1, "top_fraction": 0.3}, "either op and value, or top_fraction"),
        ({"column": "s"}, "either op and value, or top_fraction"),
        ({"column": "s", "op": "in", "value": 3}, "needs a list value"),
        ({"column": "s", "op": ">", "value": 3}, "op"),
        ({"column": "s", "top_fraction": 1.5}, "top_fraction"),
        ({"column": "s", "op": ">=", "value": 1, "colum": "x"}, "colum"),
    ):
        with pytest.raises(ValidationError, match=message):
            FiltersConfig(columns=[bad])


def test_each_op_rejects_with_the_column_in_the_reason_and_values_from_text_compare_as_numbers():
    rules = FiltersConfig(
        columns=[
            {"column": "sim", "op": ">=", "value": 0.28},
            {"column": "nsfw", "op": "not_in", "value": ["NSFW", "UNSURE"]},
            {"column": "wm", "op": "<=", "value": 0.8},
        ]
    ).columns
    table = pa.table(
        {
            column_copy("sim"): ["0.3", "0.1", "0.5", None, "high"],  # csv values arrive as text
            column_copy("nsfw"): ["UNLIKELY", "UNLIKELY", "NSFW", "UNLIKELY", "UNLIKELY"],
            column_copy("wm"): [0.1, 0.1, 0.1, 0.1, 0.9],
        }
    )
    out = ColumnFilters(rules).rejections(table)
    assert [r and (r.stage, r.reason) for r in out] == [
        None,
        ("filter", "column:sim"),
        ("filter", "column:nsfw"),
        ("filter", "column:sim"),
        ("filter", "column:sim"),
    ]
    assert "no value" in out[3].detail and "not a number" in out[4].detail


@pytest.mark.slow
def test_top_fraction_cut_equals_numpy_and_dropped_rows_are_never_requested(ray_local, tmp_path):
    rng = np.random.default_rng(0)
    n = 23
    scores = np.round(rng.uniform(0.1, 0.4, n), 3)
    scores[5] = scores[6]  # a tie
    values = [float(s) for s in scores]
    values[9] = None  # no score: rejected, and not part of the fraction's base
    nsfw = ["UNLIKELY"] * n
    nsfw[2] = "NSFW"
    routes = {f"/{i}.jpg": jpeg_bytes(40, 40, seed=i) for i in range(n)}
    with HTTPTestServer(routes) as server:
        pq.write_table(
            pa.table(
                {
                    "url": [server.url(f"/{i}.jpg") for i in range(n)],
                    "caption": [f"caption {i}" for i in range(n)],
                    "clip_l14_similarity_score": pa.array(values, pa.float64()),
                    "NSFW": nsfw,
                }
            ),
            tmp_path / "pool.parquet",
        )
        from pipeline.run import run_pipeline

        data = DataConfig(
            input=str(tmp_path / "pool.parquet"),
            output=str(tmp_path / "out"),
            allow_private_addresses=True,
            num_download_actors=1,
            threads_per_actor=2,
            rows_per_shard=8,
            image_size=32,
            progress=False,
            filters={
                "columns": [
                    {"column": "NSFW", "op": "==", "value": "UNLIKELY"},
                    {"column": "clip_l14_similarity_score", "top_fraction": 0.3},
                ]
            },
        )
        manifest = run_pipeline(data)
        requested = sorted(int(p[1:].split(".")[0]) for p in server.paths())
    # The same cut in numpy: the best ceil(0.3 * rows with a score), ties with the last one kept.
    base = np.array([v for v in values if v is not None])
    cut = np.sort(base)[::-1][math.ceil(0.3 * len(base)) - 1]
    expected = [i for i in range(n) if nsfw[i] == "UNLIKELY" and values[i] is not None and values[i] >= cut]
    assert requested == expected
    assert manifest["accepted"] == len(expected)
    rejects = pq.read_table(sorted((tmp_path / "out" / "rejects").glob("*.parquet"))).to_pylist()
    reasons = {int(r["key"][:5]) * 8 + int(r["key"][5:]): r["reason"] for r in rejects}
    assert reasons[2] == "column:NSFW" and reasons[9] == "column:clip_l14_similarity_score"
    assert sorted(reasons) == sorted(set(range(n)) - set(expected))
    assert manifest["accepted"] + manifest["rejected"] == manifest["input_rows"] == n
