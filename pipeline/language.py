"""`data.filters.language`: keep captions written in the given languages (DataComp's "basic" filter
keeps English captions). The language-ID model is lingua's (`lingua-language-detector`, an optional
extra: `pip install 'clipray[language]'`), whose models ship inside its wheel: nothing is fetched at
run time. The check runs with the other caption filters, before any request, so a dropped row
costs no bandwidth.

Memory and time: lingua's high-accuracy models for every language it knows take about 1 GB per
process that loads them (each download actor) and ~1 ms per caption once loaded; `candidates`
limits the languages told apart (less memory, faster, but a caption in a language outside the
candidates is assigned to the closest candidate).
"""

from __future__ import annotations

from typing import Optional

from pipeline.config import LanguageFilterConfig
from pipeline.reasons import FILTER, Rejection

MISSING = (
    "data.filters.language needs the optional package lingua-language-detector "
    "(pip install 'clipray[language]'); it is not installed in this Python environment"
)


def lingua_language(code: str):
    """lingua's `Language` for an ISO 639-1 code ("en"); ValueError naming the code if lingua
    knows no such language, ImportError (MISSING) without lingua."""
    try:
        from lingua import IsoCode639_1, Language
    except ImportError as e:
        raise ImportError(MISSING) from e
    try:
        return Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper()))
    except (AttributeError, ValueError):
        raise ValueError(f"{code!r} is not an ISO 639-1 code of a language lingua detects") from None


class LanguageFilter:
    """Decides one caption at a time; the detector is built on first use (in the actor that uses
    it), not when the filter is made or pickled."""

    def __init__(self, config: LanguageFilterConfig):
        self.config = config
        self.keep = {lingua_language(code) for code in config.keep}
        self._detector = None

    def __getstate__(self):
        return {"config": self.config}

    def __setstate__(self, state):
        self.__init__(state["config"])

    def _build(self):
        from lingua import LanguageDetectorBuilder

        if self.config.candidates is None:
            builder = LanguageDetectorBuilder.from_all_languages()
        else:
            builder = LanguageDetectorBuilder.from_languages(
                *{lingua_language(code) for code in self.config.candidates} | self.keep
            )
        return builder.build()

    def rejection(self, text: str) -> Optional[Rejection]:
        """Why this (stripped, non-empty) caption is rejected, or None."""
        if self._detector is None:
            self._detector = self._build()
        values = self._detector.compute_language_confidence_values(text)
        if not values or values[0].value <= 0.0:
            return Rejection(FILTER, "language", "no language detected")
        top = values[0]
        code = top.language.iso_code_639_1.name.lower()
        if top.language not in self.keep:
            return Rejection(FILTER, "language", f"detected {code} ({top.value:.2f}), keeping {self.config.keep}")
        if top.value < self.config.min_confidence:
            return Rejection(
                FILTER,
                "language",
                f"detected {code} with confidence {top.value:.2f} < min_confidence {self.config.min_confidence:g}",
            )
        return None
