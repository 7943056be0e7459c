"""BPE vocabularies (tokenizer.json) into GGUF's `gpt2` tokenizer model.

Mirrors llama.cpp's convert_hf_to_gguf: added tokens that are special, or look
special (`<|...|>`), become CONTROL; other added tokens USER_DEFINED; ids the
tokenizer does not use up to the embedding size become `[PAD{i}]` UNUSED.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf

from .checkpoint import read_json
from .errors import ConvertError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclass(frozen=True)
class BPEVocab:
    tokens: list[str]
    token_types: list[int]


def looks_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>")


def load_bpe_vocab(model_dir: Path, n_vocab: int) -> BPEVocab:
    for name in (TOKENIZER_FILE, TOKENIZER_CONFIG):
        if not (model_dir / name).is_file():
            raise ConvertError(
                f"{model_dir / name}: tokenizer file is missing. Download the checkpoint's tokenizer files "
                f"({TOKENIZER_FILE}, {TOKENIZER_CONFIG}) into {model_dir}."
            )
    tok = read_json(model_dir / TOKENIZER_FILE, TOKENIZER_FILE)
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConvertError(f"{model_dir / TOKENIZER_FILE}: expected a BPE tokenizer with a vocab, got {model.get('type')!r}.")
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types: dict[int, int] = {i: gguf.TokenType.NORMAL for i in by_id}
    for added in tok.get("added_tokens") or []:
        i, text = int(added["id"]), added["content"]
        by_id[i] = text
        special = added.get("special", False) or looks_special(text)
        types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    top = max(by_id)
    if top >= n_vocab:
        raise ConvertError(
            f"{model_dir / TOKENIZER_FILE}: token id {top} does not fit the model's vocab_size {n_vocab} in config.json."
        )
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    token_types = [types.get(i, gguf.TokenType.UNUSED) for i in range(n_vocab)]
    return BPEVocab(tokens, token_types)


def write_bpe_vocab(writer: gguf.GGUFWriter, model_dir: Path, n_vocab: int, pre: str, add_bos: bool) -> None:
    vocab = load_bpe_vocab(model_dir, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise ConvertError(f"{model_dir / TOKENIZER_FILE}: has no BPE merges; the tokenizer file is incomplete.")
    special.add_special_token.setdefault("bos", add_bos)
    special.add_to_gguf(writer)
