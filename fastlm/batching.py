"""Turning texts into model inputs: token ids cut to a length, right-padded batches, and :class:`Batch`,
what a task hands the training loop for one micro-step.

Shared by the tasks (:mod:`fastlm.tasks`) and inference (:mod:`fastlm.generate`), which both encode
texts the same way: inputs longer than the model takes are cut, with a :class:`TruncationWarning`
that counts them, and padded batches are right-padded to their longest row (the models mask the
padding).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer

IGNORE = -100  # target id of padded positions: skipped by the loss


class TruncationWarning(UserWarning):
    """Some inputs were longer than the model takes and were cut."""


@dataclass
class Batch:
    tensors: tuple[torch.Tensor, ...]  # the model's positional arguments, on CPU
    tokens: int  # real (unpadded) tokens in it, for tokens/s
    flops: float  # model FLOPs of its forward + backward, for MFU
    loss_terms: int  # what its mean loss averages over (target tokens, examples)


def pad(seqs: list[np.ndarray], value: int) -> torch.Tensor:
    """Right-pad 1-D int sequences (arrays or lists) to the longest: (B, T) int64."""
    out = np.full((len(seqs), max(len(s) for s in seqs)), value, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return torch.from_numpy(out)


def lengths(seqs: list[np.ndarray]) -> np.ndarray:
    """The lengths of ``seqs``, int64 on the host: batch sizes and FLOPs are counted from these, never
    from a tensor's values, so preparing a batch reads nothing back from a device."""
    return np.array([len(s) for s in seqs], dtype=np.int64)


def encode_texts(tokenizer: Tokenizer, texts: list[str], max_len: int, what: str,
                 append: int | None = None) -> list[np.ndarray]:
    """Token ids of each text (plus ``append``, kept last), cut to ``max_len`` tokens; warns with a count
    when any was cut. An empty text encodes to no tokens: callers reject those first."""
    out, cut = [], 0
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids = enc.ids
        room = max_len - (append is not None)
        if len(ids) > room:
            ids, cut = ids[:room], cut + 1
        if append is not None:
            ids = ids + [append]
        out.append(np.asarray(ids, dtype=np.int64))
    if cut:
        warnings.warn(f"{cut} of {len(texts)} {what} were longer than {max_len} tokens and were truncated "
                      f"to it; raise {'target_len' if 'target' in what else 'seq_len'} (and block_size) "
                      "to keep them whole", TruncationWarning, stacklevel=2)
    return out
