"""Byte-level BPE, trained locally with Hugging Face ``tokenizers`` and saved as ``tokenizer.json``.

Byte-level means every byte string has an encoding (no unknown tokens), and the
same pre-tokenizer as GPT-2, with two additions:

- Every digit is a pre-token of its own (as Llama, Qwen and DeepSeek do), so no
  token holds two digits: a model reads and writes numbers digit by digit instead
  of learning the identity of each digit run BPE merged (``2026`` is four tokens,
  the space before a number one more). Digits are split off on the text, before
  the byte-level mapping: after it, continuation bytes of other characters look
  like digits (the second byte of ``β`` becomes ``²``) and would be cut away.
- A pre-token (a run of letters, punctuation or whitespace) longer than
  ``MAX_PRETOKEN_BYTES`` is cut into pieces of that many bytes. BPE training costs
  time quadratic in the length of a pre-token (a 3 MB line of letters trained for
  hours); ordinary text, whose words and lines are shorter, is not cut.

One special token, ``<|endoftext|>``, separates documents in the token stream. A run
keeps the ``tokenizer.json`` it started with, so runs made before a change to this
recipe resume (and sample) with their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
MAX_PRETOKEN_BYTES = 128  # longer than any word or code line worth a token of its own


def train_tokenizer(texts: Iterable[str], vocab_size: int, progress: bool = False,
                    split_digits: bool = True) -> Tokenizer:
    """Learn a byte-level BPE of at most ``vocab_size`` tokens (fewer on a tiny corpus); ``progress``
    shows the trainer's progress bars. ``split_digits=False`` lets BPE merge digits, as before
    single-digit pre-tokens (for comparisons with the older recipe)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        *([pre_tokenizers.Digits(individual_digits=True)] if split_digits else []),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        # After ByteLevel each byte is one (printable) character, so this counts bytes.
        pre_tokenizers.Split(Regex(f".{{1,{MAX_PRETOKEN_BYTES}}}"), behavior="isolated"),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load ``tokenizer.json`` (plain JSON, no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None


def eot_id(tokenizer: Tokenizer) -> int:
    token = tokenizer.token_to_id(EOT)
    if token is None:
        raise ValueError(f"tokenizer has no {EOT} token")
    return token


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray | None:
    """The bytes of text each token id stands for (0 for a special token such as ``<|endoftext|>``), indexed by
    id: what a loss per token is divided by to give a loss per byte, comparable across tokenizers. Known for a
    byte-level BPE (each character of a token is one byte); None for any other kind of tokenizer."""
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    special = {i for i, added in tokenizer.get_added_tokens_decoder().items() if added.special}
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for token, i in tokenizer.get_vocab(with_added_tokens=True).items():
        if i in special:
            continue
        if not alphabet.issuperset(token):
            return None
        lengths[i] = len(token)
    return lengths


def encode_documents(tokenizer: Tokenizer, docs: Iterable[str], batch: int = 256) -> Iterator[list[int]]:
    """Token ids of each document followed by ``<|endoftext|>``, encoded in parallel batches."""
    eot = eot_id(tokenizer)
    pending: list[str] = []
    for doc in docs:
        pending.append(doc)
        if len(pending) == batch:
            for enc in tokenizer.encode_batch(pending, add_special_tokens=False):
                yield enc.ids + [eot]
            pending = []
    for enc in tokenizer.encode_batch(pending, add_special_tokens=False):
        yield enc.ids + [eot]
