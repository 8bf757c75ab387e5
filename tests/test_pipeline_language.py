"""`data.filters.language`: captions kept by the language lingua detects (DataComp's "basic"
English filter), decided with the caption filters before any request; a missing optional package
or an unknown language code is refused when the config is read, naming the key."""

from __future__ import annotations

import pickle
import sys

import pyarrow as pa
import pytest
from pydantic import ValidationError

from pipeline.config import DataConfig, FiltersConfig
from pipeline.eligibility import table_rejections
from pipeline.filters import RowFilters

pytest.importorskip("lingua", reason="lingua-language-detector (the optional extra `language`) is not installed")

ENGLISH = ["a photo of a dog running on the beach", "modern kitchen design with white cabinets"]
OTHERS = {"de": "ein kleiner Hund läuft am Strand entlang", "fr": "un petit chien qui court sur la plage"}


def test_captions_in_kept_languages_pass_and_the_others_are_rejected_before_download():
    filters = RowFilters(FiltersConfig(language={"keep": ["en"]}))
    captions = [*ENGLISH, *OTHERS.values(), "   "]
    table = pa.table(
        {
            "url": [f"http://img.example/{i}.jpg" for i in range(len(captions))],
            "caption": captions,
            "caption_ok": [True] * len(captions),
        }
    )
    verdicts = table_rejections(table, filters)  # the one rule the download and the dedup share
    assert verdicts[:2] == [None, None]
    for verdict, code in zip(verdicts[2:4], OTHERS):
        assert (verdict.stage, verdict.reason) == ("filter", "language")
        assert verdict.detail.startswith(f"detected {code} ")
    assert verdicts[4].reason == "caption_empty"  # the cheaper caption rules come first


def test_min_confidence_and_candidates_narrow_the_decision():
    text = ENGLISH[0]
    assert RowFilters(FiltersConfig(language={"keep": ["en"]})).caption(text, True) is None
    unsure = RowFilters(FiltersConfig(language={"keep": ["en"], "min_confidence": 0.999})).caption(text, True)
    assert unsure.reason == "language" and "< min_confidence 0.999" in unsure.detail
    # Told apart from German alone, a French caption is whichever of the two it is closer to.
    two = RowFilters(FiltersConfig(language={"keep": ["de"], "candidates": ["en"]}))
    assert two.caption(OTHERS["de"], True) is None
    assert two.caption(ENGLISH[1], True).detail.startswith("detected en ")


def test_the_filter_pickles_without_its_detector_and_decides_the_same_in_a_copy():
    filters = RowFilters(FiltersConfig(language={"keep": ["en"]}))
    assert filters.caption(OTHERS["fr"], True).reason == "language"  # the detector is built now
    copy = pickle.loads(pickle.dumps(filters))  # what Ray ships to each download actor
    assert copy.language._detector is None
    assert copy.caption(OTHERS["fr"], True).detail == filters.caption(OTHERS["fr"], True).detail


def test_unknown_codes_and_a_missing_package_are_refused_naming_the_key(monkeypatch):
    with pytest.raises(ValidationError, match=r"data.filters.language.keep: 'xx' is not an ISO 639-1 code"):
        DataConfig(input="in.parquet", output="out", filters={"language": {"keep": ["xx"]}})
    with pytest.raises(ValidationError, match=r"data.filters.language.candidates: 'english'"):
        FiltersConfig(language={"keep": ["en"], "candidates": ["english"]})
    with pytest.raises(ValidationError, match="keep"):
        FiltersConfig(language={"keep": []})
    monkeypatch.setitem(sys.modules, "lingua", None)  # as if the optional extra were not installed
    with pytest.raises(ValidationError, match=r"needs the optional package lingua-language-detector"):
        FiltersConfig(language={"keep": ["en"]})
