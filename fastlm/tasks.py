"""What the training loop trains: a task brings its data, model, batches and evaluation.

:class:`Task` is the interface the loop (and ``fastlm train``) relies on; :data:`TASKS` names the
implementations. Batching helpers live in :mod:`fastlm.batching`, the validation metrics and model
FLOPs in :mod:`fastlm.metrics`.

One loop (:func:`fastlm.train.train`) serves three tasks, chosen by ``TrainConfig.task``:

- ``lm``: next-token prediction with :class:`~fastlm.model.GPT` on a text corpus
  (:mod:`fastlm.data`); evaluated by validation loss, perplexity and bits per byte of text.
- ``classify``: a label per text with :class:`~fastlm.model.Classifier`, from a CSV or
  JSONL file of ``text,label`` (:mod:`fastlm.taskdata`); evaluated on the whole held-out
  split by loss, accuracy, macro-F1 and a confusion matrix (past ``metrics.FULL_CONFUSION_LABELS``
  labels kept out of ``metrics.jsonl``, in ``confusion.json``, and printed as a summary).
- ``seq2seq``: a target text per source text with :class:`~fastlm.model.Seq2Seq`, from a
  JSONL file of ``{"source", "target"}``; evaluated by teacher-forced loss on the held-out
  split, and BLEU (sacrebleu) and exact match of greedy decodes of its first
  ``eval_batches * batch_size`` examples.

Everything a task returns is a pure function of (seed, step, micro-step) and the data,
so resuming stays exact. Inputs longer than ``seq_len`` (and seq2seq targets longer
than ``target_len``) are truncated, with a :class:`~fastlm.batching.TruncationWarning`
that counts them. Padded batches are right-padded to their longest row; the models mask
the padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from tokenizers import Tokenizer

from . import data as data_lib
from . import distributed
from . import taskdata
from .batching import IGNORE, Batch, encode_texts, lengths, pad
from .config import Config, ConfigError
from .generate import decode_batch
from .metrics import (bits_per_byte, classification_metrics, classifier_flops, format_confusion, load_sacrebleu,
                      perplexity, seq2seq_flops, seq2seq_metrics)
from .model import build_model
from .rundir import read_labels
from .tokenizer import eot_id, load_tokenizer, token_byte_lengths

SPLIT_VERSION = 2  # bump when taskdata.split_examples draws a different split (tokenizer cache key)


@dataclass
class Prepared:
    """What a task's data set-up hands back to the loop."""

    tokenizer: Tokenizer
    info: dict[str, Any]  # written to data.json (corpus_hash included)
    summary: str  # one line for the log


@runtime_checkable
class Task(Protocol):
    """What the training loop and ``fastlm train`` ask of a task. A task is made from the run's config
    (``TASKS[cfg.train.task](cfg)``, :func:`make_task`) and used in this order: :meth:`load`,
    :meth:`prepare`, :meth:`build_model`, then per step :meth:`step_loss_terms` and a :meth:`train_batch`
    per micro-step, :meth:`evaluate` and :meth:`describe` at each evaluation, :meth:`report` once the
    command line's run is over. The class attributes serve the command line before anything is loaded.
    """

    name: str  # its TrainConfig.task value
    default_preset: str  # the preset `fastlm train --task NAME` starts from without --preset
    usage: str  # how to use a trained run, printed after training; "{run}" stands for its directory

    def load(self) -> str:
        """Read the data set; return its content hash, which a resumed run checks before anything else."""
        ...

    def prepare(self, run_dir: Path, saved_info: dict | None, init_from: str | Path | None) -> Prepared:
        """Split and tokenize the loaded data: with ``saved_info`` (a resumed run's data.json) with the run's
        own tokenizer.json, with ``init_from`` the imported checkpoint's tokenizer if it has one, else a
        tokenizer trained (or cached) for this data. May complete the config from the data (a classifier's
        ``num_classes``) before it is written; raises ConfigError or DataError on what does not fit."""
        ...

    def build_model(self) -> nn.Module:
        """A freshly initialised model (the caller seeds torch) whose forward takes a
        :class:`~fastlm.batching.Batch`'s tensors and returns the batch's mean loss."""
        ...

    def train_batch(self, step: int, micro: int, shard: tuple[int, int]) -> Batch:
        """Micro-batch ``micro`` of ``step``: the part ``shard = (rank, world_size)`` of the whole job's,
        a pure function of (seed, step, micro) and the data, so resuming stays exact."""
        ...

    def step_loss_terms(self, step: int) -> int:
        """What the mean loss of the whole of ``step`` averages over (every micro-batch, every rank): tokens
        or examples, from the data alone (no device work), so each micro-batch's loss is weighted by its share."""
        ...

    def evaluate(self, model: nn.Module, device: torch.device,
                 autocast: Callable[[], ContextManager]) -> dict[str, Any]:
        """The validation metrics (``val_loss`` and the task's own ``val_*``, JSON-able), the same on every
        rank; forwards run under ``autocast()``. Called under ``torch.no_grad`` with the model in eval mode."""
        ...

    def describe(self, metrics: dict[str, Any]) -> str:
        """:meth:`evaluate`'s metrics as a phrase for the training log."""
        ...

    def report(self, evals: dict[str, Any], run_dir: Path) -> str:
        """What ``fastlm train`` prints after the final losses of a run in ``run_dir`` whose last evaluation
        gave ``evals``: the rest of that line (the task's own metrics) and any further lines it needs."""
        ...


# ----------------------------------------------------------------------------- language modelling


class LanguageModeling(Task):
    """Next-token prediction on a corpus of documents (fastlm.data)."""

    name = "lm"
    default_preset = "tiny"
    usage = "sample from it: fastlm sample --run {run} --prompt 'class'"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def load(self) -> str:
        """Read the documents; their hash (a resumed run checks it before anything else is done)."""
        self.docs = data_lib.load_documents(self.cfg.train.data)
        self.data_hash = data_lib.corpus_hash(self.docs)
        return self.data_hash

    def prepare(self, run_dir: Path, saved_info: dict | None, init_from: str | Path | None) -> Prepared:
        t = self.cfg.train
        docs, chash = self.docs, self.data_hash
        with distributed.main_first():  # caches are built once per machine
            if saved_info is not None:
                tokenizer = load_tokenizer(run_dir / "tokenizer.json")
            elif init_from is not None and (Path(init_from) / "tokenizer.json").is_file():
                tokenizer = load_tokenizer(Path(init_from) / "tokenizer.json")  # the imported weights' own
            else:
                tokenizer = data_lib.cached_tokenizer(docs, chash, t.val_fraction, self.cfg.model.vocab_size)
            _check_vocab(tokenizer, self.cfg)
            self.tokens = data_lib.tokenize_corpus(docs, chash, tokenizer, t.val_fraction)
        self.token_bytes = token_byte_lengths(tokenizer)  # None: val_bpb is not reported
        self.eot = eot_id(tokenizer) if t.document_mask else None  # batches carry their documents' spans
        data_lib.check_lengths(self.tokens, t.seq_len)
        info = {"task": self.name, "source": t.data or "python-stdlib", "corpus_hash": chash,
                "documents": self.tokens.num_documents, "train_tokens": len(self.tokens.train),
                "val_tokens": len(self.tokens.val), "tokens_sha256": self.tokens.sha256,
                "tokenizer_vocab": tokenizer.get_vocab_size()}
        summary = (f"{len(docs)} documents from {t.data or 'the Python standard library'}, "
                   f"{len(self.tokens.train):,} train / {len(self.tokens.val):,} val tokens")
        return Prepared(tokenizer, info, summary)

    def build_model(self) -> nn.Module:
        return build_model(self.cfg.model, self.name)

    def train_batch(self, step: int, micro: int, shard: tuple[int, int]) -> Batch:
        t = self.cfg.train
        tensors = data_lib.train_batch(self.tokens, t.seed, step, micro, t.batch_size, t.seq_len, shard, self.eot)
        x, y = tensors[:2]
        if self.eot is None:
            flops = x.numel() * self.cfg.model.flops_per_token(t.seq_len)
        else:  # attention runs over each document, not the whole row
            flops = self.cfg.model.lm_flops(np.diff(tensors[2].numpy()))
        return Batch(tensors, x.numel(), flops, y.numel())

    def step_loss_terms(self, step: int) -> int:
        """Loss terms of a whole step (every micro-batch, every rank): a token each."""
        t = self.cfg.train
        return t.grad_accum * t.batch_size * t.seq_len

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, autocast: Callable) -> dict[str, Any]:
        """Mean loss over the fixed validation batches (each rank evaluates its part of each)."""
        t = self.cfg.train
        losses, text_bytes = [], 0
        shard = (distributed.rank(), distributed.world_size())
        for i in range(t.eval_batches):
            tensors = data_lib.val_batch(self.tokens, t.seed, i, t.batch_size, t.seq_len, shard, self.eot)
            with autocast():
                losses.append(model(*(x.to(device) for x in tensors)).float())
            if self.token_bytes is not None:
                text_bytes += int(self.token_bytes[tensors[1].numpy()].sum())  # on the host, from the batch's ids
        val_loss = distributed.mean(torch.stack(losses).mean()).item()
        evals = {"val_loss": val_loss, "val_ppl": perplexity(val_loss)}
        if self.token_bytes is not None:
            text_bytes = distributed.total(torch.tensor(text_bytes, dtype=torch.float64)).item()
            evals["val_bpb"] = bits_per_byte(val_loss, t.eval_batches * t.batch_size * t.seq_len, text_bytes)
        return evals

    def describe(self, metrics: dict[str, Any]) -> str:
        bpb = f", {metrics['val_bpb']:.4f} bits/byte" if "val_bpb" in metrics else ""
        return f"val loss {metrics['val_loss']:.4f} (ppl {metrics['val_ppl']:.1f}{bpb})"

    def report(self, evals: dict[str, Any], run_dir: Path) -> str:
        return f" (ln(vocab_size) = {math.log(self.cfg.model.vocab_size):.3f})"  # the loss of a uniform guess


def _check_vocab(tokenizer: Tokenizer, cfg: Config) -> None:
    if tokenizer.get_vocab_size() > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but vocab_size is "
                          f"{cfg.model.vocab_size}")


# ----------------------------------------------------------------------------- labelled examples


class _ExampleTask(Task):
    """Shared by classification and seq2seq: examples split by group, a tokenizer trained on the
    train split's text, deterministic sampled batches, evaluation over fixed padded batches."""

    name = ""
    stratify = False

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def load_examples(self) -> list[taskdata.Example]:
        raise NotImplementedError

    def tokenizer_texts(self, train: list[taskdata.Example]):
        raise NotImplementedError

    def encode(self, tokenizer: Tokenizer, examples: list[taskdata.Example], what: str) -> dict[str, list]:
        raise NotImplementedError

    def load(self) -> str:
        """Read the examples; their hash (a resumed run checks it before anything else is done)."""
        self.examples = self.load_examples()
        self.data_hash = taskdata.examples_hash(self.examples)
        return self.data_hash

    def prepare(self, run_dir: Path, saved_info: dict | None, init_from: str | Path | None) -> Prepared:
        if init_from is not None:
            raise ConfigError(f"--init-from imports decoder-only language models; task {self.name} trains from "
                              "scratch")
        t = self.cfg.train
        examples, chash = self.examples, self.data_hash
        train, val = taskdata.split_examples(examples, t.val_fraction, stratify=self.stratify)
        self.val_examples = val
        with distributed.main_first():
            if saved_info is not None:
                tokenizer = load_tokenizer(run_dir / "tokenizer.json")
            else:
                key = (f"{data_lib.CACHE_FORMAT}:{self.name}:{SPLIT_VERSION}:{chash}:{t.val_fraction}:"
                       f"{self.cfg.model.vocab_size}")  # trained on the train split: keyed by how it is drawn
                chars = sum(len(e.source) + len(e.target) for e in examples)
                tokenizer = data_lib.tokenizer_from_cache(key, lambda: self.tokenizer_texts(train),
                                                          self.cfg.model.vocab_size, data_lib.show_progress(chars))
        _check_vocab(tokenizer, self.cfg)
        self.tokenizer, self.eot = tokenizer, eot_id(tokenizer)
        self.train = self.encode(tokenizer, train, "training")
        self.val = self.encode(tokenizer, val, "validation")
        info = {"task": self.name, "source": t.data or f"python-stdlib-{self.name}", "corpus_hash": chash,
                "examples": len(examples), "train_examples": len(train), "val_examples": len(val),
                "tokenizer_vocab": tokenizer.get_vocab_size()}
        summary = (f"{len(examples):,} examples from {t.data or 'the built-in ' + self.name + ' task'}, "
                   f"{len(train):,} train / {len(val):,} val (split by {'file' if t.data is None else 'row'})")
        return Prepared(tokenizer, info, summary)

    def build_model(self) -> nn.Module:
        return build_model(self.cfg.model, self.name)

    def _sample(self, step: int, micro: int, shard: tuple[int, int]) -> np.ndarray:
        t = self.cfg.train
        rng = data_lib.train_rng(t.seed, step, micro)
        rows = rng.integers(0, len(self.train["source"]), size=t.batch_size)  # the whole batch's, then our part
        return data_lib.shard_rows(rows, shard)

    def train_batch(self, step: int, micro: int, shard: tuple[int, int]) -> Batch:
        return self._batch(self.train, self._sample(step, micro, shard))

    def step_loss_terms(self, step: int) -> int:
        """Loss terms of a whole step (every micro-batch, every rank), from the batches' rows alone."""
        return sum(self._loss_terms(self.train, self._sample(step, micro, (0, 1)))
                   for micro in range(self.cfg.train.grad_accum))

    def _eval_batches(self, count: int):
        """Rows [0, count) of the validation split in global batches of ``batch_size``, this rank's part of each.
        Every rank runs the same number of forwards (FSDP gathers weights in each); a rank with no row in a
        batch runs row 0 and gives it weight 0."""
        t = self.cfg.train
        shard = (distributed.rank(), distributed.world_size())
        for start in range(0, count, t.batch_size):
            rows = data_lib.shard_rows(np.arange(start, min(start + t.batch_size, count)), shard)
            yield (rows, 1.0) if len(rows) else (np.zeros(1, dtype=np.int64), 0.0)


# ----------------------------------------------------------------------------- classification


class Classification(_ExampleTask):
    name = "classify"
    default_preset = "tiny-classify"
    usage = "predict with it: fastlm classify --run {run} 'TEXT' ..."
    stratify = True

    def load_examples(self) -> list[taskdata.Example]:
        examples = taskdata.load_classification(self.cfg.train.data)
        self.labels = taskdata.label_names(examples)
        return examples

    def prepare(self, run_dir: Path, saved_info: dict | None, init_from: str | Path | None) -> Prepared:
        prepared = super().prepare(run_dir, saved_info, init_from)
        m = self.cfg.model
        if saved_info is not None and saved_info.get("labels") != self.labels:
            raise data_lib.DataError("the label set differs from the run's")
        if m.num_classes == 0:
            m.num_classes = len(self.labels)  # written into the run's config.json
        elif m.num_classes != len(self.labels):
            raise ConfigError(f"num_classes is {m.num_classes} but the data has {len(self.labels)} labels: "
                              f"{', '.join(self.labels)}")
        prepared.info["labels"] = self.labels
        prepared.summary += f", {len(self.labels)} labels"
        return prepared

    def tokenizer_texts(self, train):
        return (e.source for e in train)

    def encode(self, tokenizer, examples, what):
        index = {label: i for i, label in enumerate(self.labels)}
        return {"source": encode_texts(tokenizer, [e.source for e in examples], self.cfg.train.seq_len,
                                       f"{what} texts"),
                "label": np.array([index[e.target] for e in examples], dtype=np.int64)}

    def _batch(self, split: dict, rows: np.ndarray) -> Batch:
        seqs = [split["source"][r] for r in rows]
        lens = lengths(seqs)
        return Batch((pad(seqs, 0), torch.from_numpy(lens), torch.from_numpy(split["label"][rows])), int(lens.sum()),
                     classifier_flops(self.cfg.model, lens), self._loss_terms(split, rows))

    def _loss_terms(self, split: dict, rows: np.ndarray) -> int:
        return len(rows)  # an example each

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, autocast: Callable) -> dict[str, Any]:
        """Loss, accuracy, macro-F1 and the confusion matrix over the whole validation split."""
        k = len(self.labels)
        confusion = torch.zeros(k, k, dtype=torch.float64)  # rows: true label, columns: predicted
        loss_sum = torch.zeros((), dtype=torch.float64)
        for rows, weight in self._eval_batches(len(self.val["label"])):
            x, lens, y = (t.to(device) for t in self._batch(self.val, rows).tensors)
            with autocast():
                logits = model(x, lens)
            logits = logits.float()
            loss_sum += weight * torch.nn.functional.cross_entropy(logits, y, reduction="sum").double().cpu()
            pred = logits.argmax(dim=-1)
            confusion += weight * torch.bincount((y * k + pred).cpu(), minlength=k * k).view(k, k).double()
        confusion, loss_sum = distributed.total(confusion), distributed.total(loss_sum)
        return {"val_loss": loss_sum.item() / confusion.sum().item(), **classification_metrics(confusion)}

    def describe(self, metrics: dict[str, Any]) -> str:
        return (f"val loss {metrics['val_loss']:.4f}, accuracy {metrics['val_accuracy']:.3f}, "
                f"macro-F1 {metrics['val_macro_f1']:.3f}")

    def report(self, evals: dict[str, Any], run_dir: Path) -> str:
        return (f", accuracy {evals['val_accuracy']:.3f}, macro-F1 {evals['val_macro_f1']:.3f} "
                f"(chance {1 / self.cfg.model.num_classes:.3f})\n"
                f"confusion matrix on the validation split (rows: true label):\n"
                f"{format_confusion(evals['val_confusion'], read_labels(run_dir))}")


# ----------------------------------------------------------------------------- sequence to sequence


class SequenceToSequence(_ExampleTask):
    name = "seq2seq"
    default_preset = "tiny-seq2seq"
    usage = "translate with it: fastlm translate --run {run} 'TEXT' ..."

    def load_examples(self) -> list[taskdata.Example]:
        load_sacrebleu()  # before any training, not at the first evaluation
        return taskdata.load_seq2seq(self.cfg.train.data)

    def tokenizer_texts(self, train):
        return (text for e in train for text in (e.source, e.target))

    def encode(self, tokenizer, examples, what):
        t = self.cfg.train
        return {"source": encode_texts(tokenizer, [e.source for e in examples], t.seq_len, f"{what} sources"),
                # The end token is kept when a target is cut, so the model still learns to stop.
                "target": encode_texts(tokenizer, [e.target for e in examples], t.target_len, f"{what} targets",
                                       append=self.eot)}

    def _batch(self, split: dict, rows: np.ndarray) -> Batch:
        src = [split["source"][r] for r in rows]
        tgt = [split["target"][r] for r in rows]
        src_lens, tgt_lens = lengths(src), lengths(tgt)
        tgt_in = [np.concatenate([[self.eot], s[:-1]]) for s in tgt]  # the target shifted behind a start token
        tensors = (pad(src, 0), torch.from_numpy(src_lens), pad(tgt_in, 0), pad(tgt, IGNORE))
        return Batch(tensors, int(src_lens.sum() + tgt_lens.sum()),
                     seq2seq_flops(self.cfg.model, src_lens, tgt_lens), int(tgt_lens.sum()))

    def _loss_terms(self, split: dict, rows: np.ndarray) -> int:
        return sum(len(split["target"][r]) for r in rows)  # a target token each

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, autocast: Callable) -> dict[str, Any]:
        """Teacher-forced loss over the validation split (per target token); BLEU and exact match of greedy
        decodes of its first ``eval_batches * batch_size`` examples."""
        t = self.cfg.train
        sums = torch.zeros(2, dtype=torch.float64)  # loss x tokens, tokens
        for rows, weight in self._eval_batches(len(self.val["source"])):
            batch = self._batch(self.val, rows)
            with autocast():
                loss = model(*(x.to(device) for x in batch.tensors)).float()
            n = batch.loss_terms  # the real target tokens the mean ran over
            sums += weight * torch.tensor([loss.item() * n, n], dtype=torch.float64)
        sums = distributed.total(sums)

        count = min(len(self.val["source"]), t.eval_batches * t.batch_size)
        hyps: list[tuple[int, list[int]]] = []
        core = getattr(model, "_orig_mod", model)  # decoding calls the model's methods, not its forward:
        core = getattr(core, "module", core)  # unwrap torch.compile and DDP
        for rows, weight in self._eval_batches(count):
            src = [self.val["source"][r] for r in rows]
            with autocast(), distributed.unsharded(core):
                out = decode_batch(core, src, t.target_len, self.eot, beam_size=1,
                                   fixed_steps=distributed.world_size() > 1)
            if weight:
                hyps += list(zip(rows.tolist(), out))
        hyps = sorted(distributed.gather_objects(hyps))
        texts = [self.tokenizer.decode(ids) for _, ids in hyps]
        refs = [self.val_examples[i].target for i, _ in hyps]
        return {"val_loss": (sums[0] / sums[1]).item(), **seq2seq_metrics(texts, refs)}

    def describe(self, metrics: dict[str, Any]) -> str:
        return (f"val loss {metrics['val_loss']:.4f}, BLEU {metrics['val_bleu']:.2f}, "
                f"exact match {metrics['val_exact_match']:.3f}")

    def report(self, evals: dict[str, Any], run_dir: Path) -> str:
        return f", BLEU {evals['val_bleu']:.2f}, exact match {evals['val_exact_match']:.3f}"


TASKS: dict[str, type[Task]] = {"lm": LanguageModeling, "classify": Classification, "seq2seq": SequenceToSequence}


def make_task(cfg: Config) -> Task:
    return TASKS[cfg.train.task](cfg)
