"""CLIP's tokenizer: lower-cased byte-level BPE, 49,408 ids, fixed context length (77 by default).

    tokenize(["a photo of a dog", ...], context_length=77) -> torch.LongTensor [N, 77]

Each row is <start_of_text>, the caption's BPE ids, <end_of_text>, then zeros. A caption too long
for the context is cut so that the last id is still <end_of_text>.

Text is cleaned as CLIP cleans it (`training.text_clean`: ftfy.fix_text, HTML unescaped twice,
whitespace runs collapsed to one space, stripped, lower-cased). Words are split with CLIP's own
pattern (the `regex` module, case-insensitive) and each word is byte-level BPE encoded with CLIP's
merges file (`bpe_simple_vocab_16e6.txt.gz`, see `BPE_LICENSE`).

Speed (the default `fast=True` path), all id-identical to CLIP's definition:
- captions are fixed (ftfy, html) one by one only where `text_clean` cannot show that nothing
  would change (plain ASCII and most accented, CJK or emoji text need no call);
- no pattern match spans whitespace, so a caption's ids are the concatenation of the ids of its
  space-separated chunks: ids are cached per chunk ("dog," -> [1929, 267]); a batch is joined,
  lower-cased and split once, and its chunks are mapped to ids in one pass;
- chunks not seen yet are split into words with CLIP's pattern and their BPE runs in HF
  `tokenizers` (Rust), one batch per call.
`ReferenceBPE` is the plain-Python BPE (the definition the tests hold the fast path to;
`fast=False` uses it alone).
"""

from __future__ import annotations

import gzip
import re
import threading
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import regex
import torch

from training.text_clean import check_text, clean_text, fix_batch, is_plain_ascii

MERGES_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
NUM_MERGES = 49152 - 256 - 2  # 48,894 merges: 256 bytes x2 (plain, end-of-word) + merges + 2 specials
SOT_TEXT, EOT_TEXT = "<start_of_text>", "<end_of_text>"
VOCAB_SIZE = 49408
SOT_ID, EOT_ID = 49406, 49407
DEFAULT_CONTEXT_LENGTH = 77

# CLIP's pre-tokenisation: specials, English contractions, letter runs, single digits, other runs.
_WORD_PATTERN = (
    r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
    r"[^\s\p{L}\p{N}]+"
)
_WORD_RE = regex.compile(_WORD_PATTERN, regex.IGNORECASE)
# Separates the captions of a batch in the bulk path; never in a caption that takes that path.
_ROW_END = "\x00"
# The chunk cache holds each chunk's ids as int32 bytes, so a batch's ids are one bytes.join.
_IDS = np.dtype("<i4")
_ROW_END_IDS = np.array([-1], dtype=_IDS).tobytes()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character map, in CLIP's vocabulary order.

    The 188 printable Latin-1 bytes map to themselves and come first; the other 68 bytes follow in
    byte order, mapped to code points 256, 257, ... The order matters: it is the order of ids 0-255.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def _clean_chunks(text: str) -> list[str]:
    """clean_text(text).split(" "), without the empty chunk of empty text."""
    if is_plain_ascii(text):
        return text.lower().split()
    cleaned = clean_text(text)
    return cleaned.split(" ") if cleaned else []


@lru_cache(maxsize=1)
def load_merges() -> tuple[tuple[str, str], ...]:
    """The 48,894 BPE merges in rank order, from the packaged merges file."""
    if not MERGES_FILE.is_file():
        raise FileNotFoundError(f"CLIP's BPE merges file {MERGES_FILE} is missing; reinstall the clipray package")
    with gzip.open(MERGES_FILE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{MERGES_FILE} is not CLIP's merges file (expected {NUM_MERGES} pairs)")
    return tuple(merges)


@lru_cache(maxsize=1)
def load_vocab() -> tuple[str, ...]:
    """Token strings in id order: 256 byte chars, the same with '</w>', the merges, the two specials."""
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in load_merges()] + [SOT_TEXT, EOT_TEXT]
    assert len(vocab) == VOCAB_SIZE
    return tuple(vocab)


class ReferenceBPE:
    """CLIP's BPE in plain Python (with a per-word cache): the definition the fast path must match."""

    def __init__(self):
        self.byte_map = bytes_to_unicode()
        self.ranks = {pair: i for i, pair in enumerate(load_merges())}
        self.ids = {tok: i for i, tok in enumerate(load_vocab())}
        self.cache = {SOT_TEXT: [SOT_ID], EOT_TEXT: [EOT_ID]}

    def _bpe(self, word: str) -> list[str]:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def encode(self, cleaned: str) -> list[int]:
        """BPE ids of already-cleaned text (no start/end tokens)."""
        out: list[int] = []
        for word in _WORD_RE.findall(cleaned):
            ids = self.cache.get(word)
            if ids is None:
                mapped = "".join(self.byte_map[b] for b in word.encode("utf-8"))
                ids = self.cache[word] = [self.ids[s] for s in self._bpe(mapped)]
            out.extend(ids)
        return out


def _build_word_bpe():
    """HF `tokenizers` BPE over CLIP's merges, for input that is already one CLIP word per item.

    No pre-tokenisation pattern here (the words come from CLIP's own pattern, see `_WORD_RE`):
    ByteLevel maps the word's UTF-8 bytes to CLIP's byte characters and BPE appends '</w>'.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(load_vocab())}
    bpe = models.BPE(
        vocab=vocab, merges=list(load_merges()), end_of_word_suffix="</w>", continuing_subword_prefix="", fuse_unk=False
    )
    tok = HFTokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return tok


class Tokenizer:
    """CLIP tokenizer. `tokenizer(texts, context_length)` -> LongTensor [N, context_length].

    fast=True (default): chunk cache + HF `tokenizers` BPE; fast=False: `ReferenceBPE` only.
    Both give identical ids. `cache_size` bounds the chunk cache (entries; it is emptied when
    full). Thread-safe; picklable (caches are rebuilt in the receiving process).
    """

    vocab_size = VOCAB_SIZE
    sot_token_id = SOT_ID
    eot_token_id = EOT_ID

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH, fast: bool = True, cache_size: int = 200_000):
        _check_context_length(context_length)
        self.context_length = context_length
        self.fast = fast
        self.cache_size = cache_size
        self._lock = threading.RLock()
        self._word_bpe = None
        self._reference: Optional[ReferenceBPE] = None
        self._chunks: dict[str, bytes] = {_ROW_END: _ROW_END_IDS}
        self._words: dict[str, tuple[int, ...]] = {SOT_TEXT: (SOT_ID,), EOT_TEXT: (EOT_ID,)}

    def __getstate__(self):
        return {"context_length": self.context_length, "fast": self.fast, "cache_size": self.cache_size}

    def __setstate__(self, state):
        self.__init__(**state)

    @property
    def reference(self) -> ReferenceBPE:
        if self._reference is None:
            with self._lock:
                if self._reference is None:
                    self._reference = ReferenceBPE()
        return self._reference

    def _learn_chunks(self, chunks: set[str]) -> dict[str, bytes]:
        """Make sure the chunk cache holds every chunk of `chunks`; return that cache.

        Words not seen yet go through HF BPE in one batch. A full cache is emptied first (and then
        refilled with all of `chunks`); callers look their chunks up in the returned dict, which
        holds them even if another thread empties the cache meanwhile.
        """
        with self._lock:
            cache = self._chunks
            missing = chunks.difference(cache)
            if len(cache) + len(missing) > self.cache_size:
                cache = self._chunks = {_ROW_END: _ROW_END_IDS}
                missing = set(chunks)
                missing.discard(_ROW_END)
            if len(self._words) > self.cache_size:
                self._words = {SOT_TEXT: (SOT_ID,), EOT_TEXT: (EOT_ID,)}
            words = self._words
            split = {c: _WORD_RE.findall(c) for c in missing}
            new_words = sorted({w for ws in split.values() for w in ws if w not in words})
            if new_words:
                if self._word_bpe is None:
                    self._word_bpe = _build_word_bpe()
                encoded = self._word_bpe.encode_batch(new_words, add_special_tokens=False)
                words.update((w, tuple(e.ids)) for w, e in zip(new_words, encoded))
            cache.update(
                (c, np.fromiter(chain.from_iterable(words[w] for w in ws), dtype=_IDS).tobytes())
                for c, ws in split.items()
            )
            return cache

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """BPE ids of each text, cleaned as CLIP does (no start/end tokens, no truncation)."""
        for i, t in enumerate(texts):
            check_text(t, i)
        if not self.fast:
            return [self.reference.encode(clean_text(t)) for t in texts]
        chunk_lists = [_clean_chunks(t) for t in texts]
        cache = self._chunks
        get = cache.__getitem__
        out: list = [None] * len(texts)
        misses = []
        for i, chunks in enumerate(chunk_lists):
            try:
                out[i] = np.frombuffer(b"".join(map(get, chunks)), dtype=_IDS).tolist()
            except KeyError:
                misses.append(i)
        if misses:
            get = self._learn_chunks({c for i in misses for c in chunk_lists[i]}).__getitem__
            for i in misses:
                out[i] = np.frombuffer(b"".join(map(get, chunk_lists[i])), dtype=_IDS).tolist()
        return out

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of one row of ids: a leading <start_of_text> dropped, cut at the first <end_of_text>."""
        row = [int(i) for i in ids]
        if row and row[0] == SOT_ID:
            row = row[1:]
        if EOT_ID in row:
            row = row[: row.index(EOT_ID)]
        vocab, inverse = load_vocab(), {c: b for b, c in bytes_to_unicode().items()}
        words = "".join(vocab[i] for i in row).split("</w>")
        return " ".join(bytearray(inverse[c] for c in w).decode("utf-8", errors="replace") for w in words if w)

    def _bulk_ids(self, chunks: list[str]) -> np.ndarray:
        """Flat ids of a flat chunk list (row ends -> -1), learning unseen chunks first."""
        try:
            return np.frombuffer(b"".join(map(self._chunks.__getitem__, chunks)), dtype=_IDS)
        except KeyError:
            cache = self._learn_chunks(set(chunks))
            return np.frombuffer(b"".join(map(cache.__getitem__, chunks)), dtype=_IDS)

    def __call__(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> torch.Tensor:
        context_length = self.context_length if context_length is None else context_length
        _check_context_length(context_length)
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        if not len(texts):
            return torch.from_numpy(out)
        if not self.fast:
            rows = self.encode_batch(texts)
            _place(out, np.arange(len(texts)), _with_row_ends(rows), context_length)
            return torch.from_numpy(out)
        # Each caption is fixed (ftfy, html) on its own where needed; then the captions are
        # lower-cased and split in two batches (ASCII, then the few others: str methods are
        # slower on a wide string), and each batch's chunks are mapped to ids in one pass.
        fixed, fixed_rows = fix_batch(texts)
        odd = [i for i in fixed_rows if _BATCH_UNSAFE.search(fixed[i])]
        wide = [i for i in fixed_rows if not fixed[i].isascii() and not _BATCH_UNSAFE.search(fixed[i])]
        narrow = list(fixed)
        for i in chain(wide, odd):
            narrow[i] = ""
        self._place_texts(out, np.arange(len(texts)), narrow, context_length)
        if wide:
            out[wide] = 0
            self._place_texts(out, np.asarray(wide), [fixed[i] for i in wide], context_length)
        if odd:
            rows = [self.reference.encode(clean_text(texts[i])) for i in odd]
            out[odd] = 0
            _place(out, np.asarray(odd), _with_row_ends(rows), context_length)
        return torch.from_numpy(out)

    def _place_texts(self, out: np.ndarray, rows: np.ndarray, fixed: list[str], context_length: int) -> None:
        """Write the ids of fixed captions (`fix_batch`) into out[rows]: lower-case and split
        them all at once, each caption followed by a row-end chunk.

        str.split() and CLIP's `\\s+` agree on every character except `_BATCH_UNSAFE`, and
        lower-casing is per character except for a final sigma, whose context ends at whitespace,
        so this gives each caption's CLIP-cleaned chunks."""
        joined = f" {_ROW_END} ".join(fixed) + f" {_ROW_END}"
        _place(out, rows, self._bulk_ids(joined.lower().split()), context_length)


# Characters the batch path cannot take in a fixed caption: the row-end chunk, and the separators
# that str.split() splits at but CLIP's `\s` does not. ftfy removes them and html.unescape never
# makes them, so no caption is expected to have them; those that did would be encoded one by one.
_BATCH_UNSAFE = re.compile("[\x00\x1c-\x1f]")


def _with_row_ends(rows: list[list[int]]) -> np.ndarray:
    return np.fromiter(
        chain.from_iterable((*r, -1) for r in rows), dtype=np.int64, count=sum(map(len, rows)) + len(rows)
    )


def _place(out: np.ndarray, rows: np.ndarray, flat: np.ndarray, context_length: int) -> None:
    """Write rows [SOT, ids..., EOT, 0...] into out[rows] from flat ids where -1 ends each row.

    A row longer than context_length - 2 ids is cut so that its last id is EOT (as CLIP does).
    """
    ends = np.flatnonzero(flat == -1)
    starts = np.concatenate([[0], ends[:-1] + 1])
    keep = np.minimum(ends - starts, context_length - 2)
    before = np.cumsum(keep) - keep  # where each row's ids start among all kept ids
    kept = np.arange(int(keep.sum()))
    src = kept + np.repeat(starts - before, keep)
    dst = kept + np.repeat(rows * context_length + 1 - before, keep)
    out.reshape(-1)[dst] = flat[src]
    out[rows, 0] = SOT_ID
    out[rows, keep + 1] = EOT_ID


def _check_context_length(context_length: int) -> None:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
        raise ValueError(f"context_length must be an int >= 2 (start and end tokens), got {context_length!r}")


_DEFAULT: dict[bool, Tokenizer] = {}


def get_tokenizer(fast: bool = True) -> Tokenizer:
    """The process-wide tokenizer (built once)."""
    if fast not in _DEFAULT:
        _DEFAULT[fast] = Tokenizer(fast=fast)
    return _DEFAULT[fast]


def tokenize(texts: Union[str, Sequence[str]], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
    """CLIP token ids: str or list of N str -> torch.LongTensor [N, context_length] (0-padded)."""
    return get_tokenizer()(texts, context_length)
