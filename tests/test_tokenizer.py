"""CLIP tokenizer: reference ids, fast path == plain-Python BPE, cleaning, truncation, API."""

from __future__ import annotations

import html
import json
import pickle
import random

import ftfy
import pytest
import regex
import torch

from training.text_clean import fix_text, is_plain_ascii
from training.tokenizer import EOT_ID, SOT_ID, VOCAB_SIZE, Tokenizer, clean_text, load_vocab, tokenize


def _full_clean(text: str) -> str:
    """CLIP's cleaning without the ASCII shortcut."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " \t\n\r\x0c  ",
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        "éèêëàâäôöùûüçñÉÀßøåæœ",
        "αβγδεζηθΣσςΩ",
        "абвгдежзийклмнопрЖЩЯ",
        "日本語中文한국어のキャプション",
        "🐶🐱🚀👍🏽❤️‍🔥",
        "\u0301\u0308\u200b\u200d\u00a0\u2028\u3000",
        "“”‘’«»—–…",
        "ﬁﬂＡＢＣ１２３",
        "\x00\x01\x07\x1b\x7f\x85\x9c",
        "\x1c\x1d\x1e\x1f\u2003\u202f\u205f",
        "ΣσςΑΟΔ",
        "ÂÃÎÐØÙ€£¢©®°·»×²³",
        "ǅǈǋ\u0345ᾼ",
    ]
    fragments = [
        "&amp;",
        "&lt;b&gt;",
        "&#39;",
        "&quot;",
        "cafÃ©",
        "Ã ",
        "'s",
        "'LL",
        "'re",
        "<end_of_text>",
        "<start_of_text>",
        "http://x.y/z?a=1&b=2",
        "don't",
        "ſ",
        "İstanbul",
        "ΣΑΣ",
        "&ldquo;",
        "&rsquo;",
        "&eacute;",
        "&EACUTE;",
        "&#x2019;",
        "&#8220;",
        "&amp;amp;",
        "&AMP;",
        "&nbsp;",
        "&#27;",
        "&#10;",
        "&#150;",
        "&#xe9;",
        "&hellip;",
        "<",
        "ОДОΣ ",
        " Σ",
        "вЂ",
        "â€™",
        "Ã¡",
        "Â ",
    ]
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 12)):
            if rng.random() < 0.15:
                parts.append(rng.choice(fragments))
            else:
                pool = rng.choice(pools)
                parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 8))))
        texts.append("".join(parts))
    return texts


def test_reference_cases_are_reproduced_exactly(shared_dir):
    ref = json.loads((shared_dir / "reference" / "tokenizer_cases.json").read_text())
    texts = [c["text"] for c in ref["cases"]]
    for ids in (tokenize(texts, ref["context_length"]), Tokenizer(fast=False)(texts)):
        assert ids.dtype == torch.long and ids.shape == (len(texts), 77)
        for row, case in zip(ids.tolist(), ref["cases"]):
            assert row == case["ids"] + [0] * (77 - len(case["ids"])), case["text"]


def test_vocabulary_has_49408_entries_with_specials_last():
    vocab = load_vocab()
    assert len(vocab) == VOCAB_SIZE == 49408 and len(set(vocab)) == 49408
    assert vocab[SOT_ID] == "<start_of_text>" and vocab[EOT_ID] == "<end_of_text>"
    assert vocab[320] == "a</w>"


def test_fast_path_matches_reference_bpe_on_varied_text():
    texts = _random_texts(1500, seed=0)
    fast, ref = Tokenizer(fast=True), Tokenizer(fast=False)
    assert fast.encode_batch(texts) == ref.encode_batch(texts)
    # The batch path (plain-ASCII captions in bulk, the others one by one) gives the same rows.
    for context_length in (77, 12):
        assert torch.equal(fast(texts, context_length), ref(texts, context_length))


def test_small_chunk_cache_is_emptied_and_refilled_without_changing_ids():
    texts = _random_texts(400, seed=3) + ["a photo of a dog"] * 3
    more = _random_texts(50, seed=4)
    tok = Tokenizer(cache_size=50)
    first = tok(texts)
    cache = tok._chunks
    assert len(cache) > 50  # one batch may hold more chunks than the bound
    second = tok(more + texts)
    assert tok._chunks is not cache  # full: emptied before learning the new chunks
    reference = Tokenizer(fast=False)
    assert torch.equal(first, reference(texts)) and torch.equal(second, reference(more + texts))


def test_empty_batch_gives_an_empty_tensor():
    assert tokenize([]).shape == (0, 77)


def test_ascii_shortcut_cleans_exactly_like_ftfy_and_html():
    rng = random.Random(1)
    alphabet = [chr(i) for i in range(128)]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    texts += ["  Hello\tWORLD\r\n", "a &amp; b", "x\x0by", "\x1b[31mred\x1b[0m", "AT&T", "&", "p<b>q</b>"]
    texts += [f"x{a}{b}y" for a in alphabet for b in alphabet]  # every pair: '\r\n', '&#', ESC '['...
    plain = 0
    for text in texts:
        assert clean_text(text) == _full_clean(text), repr(text)
        if is_plain_ascii(text):
            plain += 1
            # ftfy changes nothing but line breaks ('\r\n', '\r' -> '\n': whitespace either way)
            assert ftfy.fix_text(text) == text.replace("\r\n", "\n").replace("\r", "\n"), repr(text)
            assert html.unescape(text) == text
    assert plain > len(texts) // 2


def test_plain_ascii_flags_every_ascii_character_in_ftfys_control_table():
    from ftfy.chardata import CONTROL_CHARS

    removed = {chr(c) for c in CONTROL_CHARS if c < 128}
    assert "\x1b" in removed and "\t" not in removed and "\r" not in removed
    for c in map(chr, range(128)):
        assert is_plain_ascii(f"a{c}b") == (c not in removed and c != "&"), repr(c)


_CLEANING_CASES = [
    "café",
    "東京タワー",
    "naïve",
    "Straße",
    "e\u0301",
    "ﬁne",
    "ＡＢＣ",
    "’s",
    "“q”",
    "a\u2028b",
    "x\x85y",
    "cafÃ©",
    "Ã\xa0 la",
    "\x9c",
    "ｶﾀｶﾅ",
    "\u0130stanbul",
    "ΣΑΣ",
    "😀",
    "\ud83d",
    "x\u00a0y",
    "tab\there",
    "line\nbreak",
    "&amp; é",
    "\x1b[1mé",
    "\u200bzero",
    "dž",
    "ǅ",
    "Ã la",
    "a Ã la",
    "“Ã ”",
    "‘cafÃ©’",
    "&ldquo;quoted&rdquo;",
    "it&rsquo;s",
    "P&EACUTE;REZ",
    "&amp;amp;amp;",
    "a &lt;b&gt; c",
    "<b>&amp;</b>",
    "x &#27; y",
    "x&#10;y",
    "&#150;",
    "&#x1F600;",
    "AT&T",
    "&notanentity;",
    "caf&eacute; “x”",
    "naïve &amp; “x”",
    "ΟΔΟΣ",
    "“\u0301",
    "\u2018\u0308a",
    "é\ufeff",
    "a\u3000b",
    "é\r\nb",
]


def _captions_with_clean_non_ascii(n: int, seed: int) -> list[str]:
    """English words mixed with accented, Greek, Cyrillic, CJK, emoji and symbol text."""
    rng = random.Random(seed)
    words = "a photo of the dog cat on in beach city old red".split()
    extras = [
        "café",
        "naïve",
        "Straße",
        "São",
        "Ελλάδα",
        "Москва",
        "東京",
        "한국어",
        "😀🎉",
        "👍🏽",
        "—",
        "…",
        "é",
        "Ñ",
        "ø",
        "£5",
        "°C",
        "×2",
        "½",
        "±",
        "«x»",
        "©",
        "™",
        "§",
        "µm",
        "²",
        "Ã",
        "Â",
        "Œ",
        "œuvre",
        "\u00a0",
        "\u0301",
        "\u200d",
        "ß",
        "İ",
        "ς",
        "€",
        "¿",
        "¡",
        "·",
        "→",
        "★",
        "│",
        "░",
    ]
    return [
        " ".join(rng.choice(extras) if rng.random() < 0.3 else rng.choice(words) for _ in range(rng.randint(1, 10)))
        + rng.choice(["", ".", "!", "é"])
        for _ in range(n)
    ]


def test_ftfy_is_skipped_only_for_text_it_leaves_unchanged():
    from training.text_clean import _ftfy_keeps

    assert _ftfy_keeps is not None, "ftfy's defaults changed: the skip is off, re-check text_clean"
    texts = _random_texts(4000, seed=5) + _captions_with_clean_non_ascii(3000, seed=7) + _CLEANING_CASES
    kept = changed = 0
    for text in texts:
        by_ftfy = ftfy.fix_text(text)
        full = html.unescape(html.unescape(by_ftfy))
        if _ftfy_keeps(text):
            kept += 1
            assert by_ftfy == text and full == text, repr(text)
        elif by_ftfy != text:
            changed += 1
        # equal up to '\r' in plain ASCII, which ftfy makes '\n' (both are whitespace to the cleaning)
        assert fix_text(text).replace("\r\n", "\n").replace("\r", "\n") == full, repr(text)
        assert clean_text(text) == regex.sub(r"\s+", " ", full.strip()).strip().lower(), repr(text)
    assert kept > 2000 and changed > 2000, (kept, changed)  # both answers exercised


@pytest.mark.parametrize(
    "text",
    [
        "cafÃ©",
        "“q”",
        "it’s",
        "ﬁne",
        "ＡＢＣ",
        "x\x85y",
        "a\u2028b",
        "é\r\nb",
        "é\x1b[1m",
        "\x9c",
        "\ud83d",
        "e\u0301",
        "é\ufeff",
        "a\u3000b",
        "é &amp;",
    ],
)
def test_ftfy_is_called_for_each_kind_of_text_it_changes(text, monkeypatch):
    import training.text_clean as text_clean

    calls = []
    real_fix_text = text_clean.ftfy.fix_text
    monkeypatch.setattr(text_clean.ftfy, "fix_text", lambda t: calls.append(t) or real_fix_text(t))
    assert real_fix_text(text) != text  # the case is one ftfy fixes
    assert fix_text(text) == html.unescape(html.unescape(real_fix_text(text))) and calls == [text]


def test_batch_calls_ftfy_only_for_captions_it_would_change(monkeypatch):
    import training.text_clean as text_clean

    calls = []
    real_fix_text = text_clean.ftfy.fix_text
    monkeypatch.setattr(text_clean.ftfy, "fix_text", lambda t: calls.append(t) or real_fix_text(t))
    texts = ["a dog", "a café in Paris", "the “best” dog", "cats &amp; dogs", "東京タワー", "cafÃ© Ã  la carte"]
    ids = Tokenizer()(texts)
    assert calls == ["the “best” dog", "cats &amp; dogs", "cafÃ© Ã  la carte"]
    monkeypatch.setattr(text_clean.ftfy, "fix_text", real_fix_text)
    assert torch.equal(ids, Tokenizer(fast=False)(texts))


def test_str_split_and_clip_whitespace_differ_only_on_characters_the_batch_path_refuses():
    from training.tokenizer import _BATCH_UNSAFE

    every_char = "".join(map(chr, range(0x110000)))
    split_at = {c for c in every_char if c.isspace()}  # what str.split() splits at
    differ = split_at ^ set(regex.findall(r"\s", every_char))
    assert differ and all(_BATCH_UNSAFE.match(c) for c in differ)
    for c in differ:  # ftfy removes them, html.unescape never makes them
        assert ftfy.fix_text(f"a{c}b") == "ab" and html.unescape(f"&#{ord(c)};") == ""


def test_captions_the_batch_path_cannot_take_are_encoded_one_by_one(monkeypatch):
    import training.text_clean as text_clean

    real = text_clean.fix_text
    monkeypatch.setattr(text_clean, "fix_text", lambda t: "odd\x1c text" if t == "ödd" else real(t))
    texts = ["a dog", "ödd", "naïve café"]
    ids = Tokenizer()(texts)
    assert torch.equal(ids, Tokenizer(fast=False)(texts))  # "ödd" went through the reference path


def test_cleaning_fixes_mojibake_entities_whitespace_and_case():
    assert clean_text("  Caf\u00c3\u00a9 &amp;amp;  CR\u00c8ME\u00a0\u3000br\u00fbl\u00e9e ") == "café & crème brûlée"
    assert tokenize("A  B").tolist() == tokenize("a b").tolist()


def test_overlong_text_is_cut_with_end_of_text_last():
    ids = tokenize(["word " * 200, "a b c"], context_length=77)
    assert ids.shape == (2, 77)
    assert ids[0, 0] == SOT_ID and ids[0, -1] == EOT_ID and (ids[0, 1:-1] != 0).all()
    assert ids[0, 1:-1].tolist() == Tokenizer().encode("word " * 200)[:75]
    assert ids[1, :5].tolist() == [SOT_ID, 320 + 0, 320 + 1, 320 + 2, EOT_ID] and ids[1, 5:].eq(0).all()


@pytest.mark.parametrize("context_length", [2, 5, 32, 77, 100])
def test_any_context_length_keeps_the_layout(context_length):
    texts = ["a photo of a dog", "", "word " * 60]
    ids = tokenize(texts, context_length=context_length)
    assert ids.shape == (3, context_length)
    for row in ids.tolist():
        assert row[0] == SOT_ID and EOT_ID in row
        end = row.index(EOT_ID)
        assert all(t == 0 for t in row[end + 1 :]) and 0 not in row[1:end]
    # Rows are the 77-token rows cut to length, with end-of-text restored where it was cut.
    full = tokenize(texts, context_length=200)
    for row, long in zip(ids.tolist(), full.tolist()):
        end = long.index(EOT_ID)
        if end < context_length:
            assert row == long[:context_length]
        else:
            assert row == long[: context_length - 1] + [EOT_ID]


def test_single_string_gives_one_row_and_eot_is_the_row_argmax():
    ids = tokenize("a photo of a cat")
    assert ids.shape == (1, 77) and ids[0].argmax().item() == ids[0].tolist().index(EOT_ID)


def test_special_token_text_in_a_caption_maps_to_the_special_id_as_clip_does():
    assert Tokenizer().encode("x <end_of_text> y") == Tokenizer(fast=False).encode("x <end_of_text> y")
    assert EOT_ID in Tokenizer().encode("x <END_OF_TEXT> y")


@pytest.mark.parametrize(
    "bad, error, message",
    [
        ([1, "a"], TypeError, "text #0 is a int"),
        (["a", None], TypeError, "text #1 is a NoneType"),
    ],
)
def test_non_string_input_is_refused_naming_its_position(bad, error, message):
    with pytest.raises(error, match=message):
        tokenize(bad)


@pytest.mark.parametrize("context_length", [0, 1, 7.5, True])
def test_bad_context_length_is_refused(context_length):
    with pytest.raises(ValueError, match="context_length must be an int >= 2"):
        tokenize("a", context_length=context_length)


def test_tokenizer_pickles_and_decodes():
    tok = pickle.loads(pickle.dumps(Tokenizer(context_length=16)))
    ids = tok(["Hello, World!", "naïve café"])
    assert ids.shape == (2, 16)
    assert tok.decode(ids[0]) == "hello , world !" and tok.decode(ids[1]) == "naïve café"
