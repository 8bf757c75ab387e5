"""The tokenizer files of a Hugging Face CLIP directory, made from our BPE vocabulary.

`vocab.json` and `merges.txt` (what transformers' `CLIPTokenizer` is built from), `tokenizer.json`
(the same tokenizer assembled with the `tokenizers` library the way `CLIPTokenizer` assembles it),
`tokenizer_config.json` and `special_tokens_map.json`. Ids equal `training.tokenizer.tokenize`'s for
text that CLIP's cleaning leaves unchanged (HF's tokenizer lower-cases, NFC-normalises and collapses
whitespace, but runs no ftfy or HTML unescaping). HF names the special tokens `<|startoftext|>` and
`<|endoftext|>` (ids 49406, 49407, as ours).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from training.tokenizer import EOT_ID, SOT_ID, load_merges, load_vocab

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's word pattern with HF's names for the special tokens (training/tokenizer.py: _WORD_PATTERN).
_SPLIT = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def hf_vocab() -> dict[str, int]:
    """Token -> id, in our id order, with HF's names for the two special tokens."""
    tokens = list(load_vocab())
    tokens[SOT_ID], tokens[EOT_ID] = BOS, EOS
    return {token: i for i, token in enumerate(tokens)}


def build_tokenizer() -> Tokenizer:
    """CLIP's BPE as a `tokenizers.Tokenizer` (what `tokenizer.json` holds)."""
    tok = Tokenizer(
        BPE(
            vocab=hf_vocab(),
            merges=list(load_merges()),
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=EOS,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing((EOS, EOT_ID), (BOS, SOT_ID), trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS)])
    return tok


def write_tokenizer_files(directory: Path, context_length: int) -> None:
    """Write the five tokenizer files into `directory` (rows of `context_length` ids)."""
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (directory / "vocab.json").write_text(json.dumps(hf_vocab(), ensure_ascii=False))
    merges = "\n".join(" ".join(pair) for pair in load_merges())
    (directory / "merges.txt").write_text("#version: 0.2\n" + merges + "\n", encoding="utf-8")
    build_tokenizer().save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": context_length,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "errors": "replace",
        **specials,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
