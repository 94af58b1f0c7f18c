"""What a run reports: ``metrics.jsonl``, ``loss.png``, model FLOPs utilisation, and the tasks'
validation metrics (accuracy, macro-F1 and the confusion matrix of a classifier, BLEU and exact
match of an encoder-decoder) with their model FLOPs.

``metrics.jsonl`` is appended one line per record, so a kill or a full disk can
tear its last line: on resume a torn last line is dropped with a warning. Any
other line that is not a JSON object with an integer ``step`` is damage from
outside fastlm, and stops the resume with an error naming the file and line.

MFU = achieved model FLOPs/s (``ModelConfig.flops_per_token`` x tokens/s) over
the device's peak dense bf16 tensor FLOPs, looked up by device name in
:data:`PEAK_BF16_FLOPS`. Unknown devices and CPUs report no MFU rather than a
guess. A classifier's and an encoder-decoder's FLOPs depend on each batch's lengths
(:func:`classifier_flops`, :func:`seq2seq_flops`). Attention is counted over the
(query, key) pairs its mask lets through (``ModelConfig.attention_flops``): causal or
not, each layer's sliding window, each packed document on its own.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError, ModelConfig
from .files import atomic_write, fault_point, writing
from .rundir import CONFUSION_FILE

# Past this many labels a confusion matrix is too big for each metrics.jsonl line (1,000 labels: 3 MB) and for
# the terminal: it is written to confusion.json and printed as its largest confusions and worst labels.
FULL_CONFUSION_LABELS = 50

# Dense (no sparsity) bf16 tensor-core peak per GPU, from the vendors' data sheets.
# Matched against torch.cuda.get_device_name() in order: longer names before their prefixes.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM and NVL
    ("H800", 989e12),
    ("H20", 148e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("A6000", 155e12),
    ("V100", 125e12),  # fp16: no bf16 on Volta
    ("T4", 65e12),  # fp16
]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def mfu(flops_per_sec: float, peak: float | None) -> float | None:
    """Achieved model FLOPs/s over the peak (None where the peak is unknown)."""
    return None if peak is None else flops_per_sec / peak


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak allocated device memory since the last reset; the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class MetricsError(ValueError):
    """``metrics.jsonl`` is damaged; the message names the file and line."""


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``, without a torn last line (dropped with a warning)."""
    lines = Path(path).read_text().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if not any(rest.strip() for rest in lines[number:]):  # the last line: torn by a kill or full disk
                warnings.warn(f"{path}, line {number}: dropped a torn last line (the run was interrupted "
                              "while writing it)", stacklevel=2)
                break
            record = None
        if not isinstance(record, dict) or type(record.get("step")) is not int:
            raise MetricsError(f"{path}, line {number} is not a metrics record (a JSON object with an integer "
                               f"\"step\"): {line[:80]!r}; fix or delete that line, then resume again")
        records.append(record)
    return records


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` and keeps the records for the plot."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and self.path.exists():
            # Lines past the checkpoint belong to steps that will run again.
            self.records = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        line = json.dumps(record) + "\n"
        with writing(self.path), open(self.path, "a") as f:
            fault_point(f"append to {self.path}", lambda: (f.write(line[:len(line) // 2]), f.flush()))  # torn
            f.write(line)

    def plot(self, path: Path) -> None:
        """Train and validation loss against step, written atomically."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train", linewidth=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats)")
        ax.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()
        # A task's own validation metric (classifier accuracy and macro-F1, seq2seq BLEU) on a second axis.
        extra = [(key, label) for key, label in (("val_accuracy", "accuracy"), ("val_macro_f1", "macro-F1"),
                                                 ("val_bleu", "BLEU"))
                 if any(key in r for r in self.records)]
        if extra:
            right = ax.twinx()
            for (key, label), style in zip(extra, ("s--", "^--")):
                right.plot(*zip(*[(r["step"], r[key]) for r in self.records if key in r]), style, label=label,
                           color="tab:green" if style == "s--" else "tab:red")
            right.set_ylabel(" / ".join(label for _, label in extra))
            more = right.get_legend_handles_labels()
            handles = (handles[0] + more[0], handles[1] + more[1])
        ax.legend(*handles)
        fig.tight_layout()
        try:
            atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        finally:
            plt.close(fig)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def bits_per_byte(loss: float, tokens: int, text_bytes: float) -> float:
    """A mean loss of ``loss`` nats per token over ``tokens`` tokens standing for ``text_bytes`` bytes of text, in
    bits per byte: unlike a loss per token, comparable between tokenizers (which cut the same text into
    different numbers of tokens)."""
    return loss * tokens / (text_bytes * math.log(2)) if text_bytes else math.inf


# ----------------------------------------------------------------------------- model FLOPs of the example tasks
# (the language model's: ModelConfig.flops_per_token)


def classifier_flops(m: ModelConfig, lens: np.ndarray) -> float:
    """Training FLOPs (forward + backward) of the encoder classifier on a batch of texts of ``lens`` tokens
    (an array on the host: counting reads no device value)."""
    return 6.0 * m.n_layer * m.layer_weights() * lens.sum().item() + m.attention_flops(lens, causal=False)


def seq2seq_flops(m: ModelConfig, src_lens: np.ndarray, tgt_lens: np.ndarray) -> float:
    """Training FLOPs (forward + backward) of the encoder-decoder on a batch of sources and targets of
    ``src_lens`` and ``tgt_lens`` tokens."""
    n_src, n_tgt = src_lens.sum().item(), tgt_lens.sum().item()
    kv = 2 * m.kv_heads * m.head_dim * m.n_embd  # cross-attention keys and values: once per source token
    encoder = 6.0 * m.encoder_layers * m.layer_weights() * n_src
    encoder += m.attention_flops(src_lens, causal=False, layers=m.encoder_layers)
    decoder = 6.0 * (m.n_layer * m.layer_weights(cross_attention=True) + m.vocab_size * m.n_embd) * n_tgt
    decoder += 6.0 * m.n_layer * kv * n_src
    decoder += m.attention_flops(tgt_lens, causal=True)
    decoder += 12.0 * m.n_layer * m.n_embd * (src_lens * tgt_lens).sum().item()  # cross-attention: no window
    return encoder + decoder


# ----------------------------------------------------------------------------- validation metrics


def classification_metrics(confusion: torch.Tensor) -> dict[str, Any]:
    """Accuracy, macro-F1 (over the labels that occur as truth or prediction) and the matrix as lists."""
    tp = confusion.diag()
    support, predicted = confusion.sum(dim=1), confusion.sum(dim=0)
    present = (support + predicted) > 0
    f1 = 2 * tp / (support + predicted).clamp(min=1)
    return {"val_accuracy": (tp.sum() / confusion.sum()).item(),
            "val_macro_f1": f1[present].mean().item() if present.any() else 0.0,
            "val_confusion": confusion.round().long().tolist()}


def seq2seq_metrics(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, its default 13a tokenisation) and the share of exact matches (whitespace-stripped)."""
    sacrebleu = load_sacrebleu()
    if not hypotheses:
        return {"val_bleu": 0.0, "val_exact_match": 0.0}
    bleu = sacrebleu.corpus_bleu(hypotheses, [references]).score
    exact = sum(h.strip() == r.strip() for h, r in zip(hypotheses, references)) / len(hypotheses)
    return {"val_bleu": bleu, "val_exact_match": exact}


def load_sacrebleu():
    """The sacrebleu module, or a ConfigError that says how to install it."""
    try:
        import sacrebleu
    except ImportError:
        raise ConfigError("task seq2seq reports BLEU with sacrebleu, which is not installed: "
                          "pip install 'fastlm[train]' (or pip install sacrebleu)") from None
    return sacrebleu


def eval_record(step: int, evals: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The ``metrics.jsonl`` line of an evaluation at ``step``: the metrics themselves, except a confusion
    matrix of more than ``FULL_CONFUSION_LABELS`` labels, which replaces ``run_dir/confusion.json``
    (atomically: the latest evaluation's) and is named by ``val_confusion_file`` instead."""
    confusion = evals.get("val_confusion")
    if confusion is None or len(confusion) <= FULL_CONFUSION_LABELS:
        return {"step": step, **evals}
    atomic_write(run_dir / CONFUSION_FILE, json.dumps({"step": step, "val_confusion": confusion}))
    return {"step": step, **{k: v for k, v in evals.items() if k != "val_confusion"},
            "val_confusion_file": CONFUSION_FILE}


def format_confusion(confusion: list[list[int]], labels: list[str], top: int = 20) -> str:
    """The confusion matrix as a table: a row per true label, a column per predicted label. Past
    ``FULL_CONFUSION_LABELS`` labels, its ``top`` largest confusions and the ``top`` labels of lowest
    recall instead."""
    if len(labels) > FULL_CONFUSION_LABELS:
        return _confusion_summary(torch.tensor(confusion, dtype=torch.float64), labels, top)
    corner = "true \\ predicted"
    width = max(5, min(10, max(len(label) for label in labels)), *(len(str(v)) for row in confusion for v in row))
    name_w = max(len(corner), *(len(label) for label in labels))
    short = [label[:width] for label in labels]
    lines = [f"{corner:<{name_w}}  " + " ".join(f"{s:>{width}}" for s in short)]
    for label, row in zip(labels, confusion):
        lines.append(f"{label:<{name_w}}  " + " ".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def _confusion_summary(confusion: torch.Tensor, labels: list[str], top: int) -> str:
    k = len(labels)
    name = [label if len(label) <= 60 else label[:57] + "..." for label in labels]  # a label can be any text
    off_diagonal = (confusion - torch.diag(confusion.diag())).flatten()
    largest = (-off_diagonal).argsort(stable=True)[:top].tolist()  # ties in label order
    lines = [f"{k:,} labels, too many for a table (the run directory's {CONFUSION_FILE} holds the whole matrix, "
             "with the labels in data.json); the most frequent confusions, true -> predicted: count"]
    lines += [f"  {name[i // k]} -> {name[i % k]}: {round(off_diagonal[i].item())}"
              for i in largest if off_diagonal[i] > 0] or ["  none"]
    support = confusion.sum(dim=1)
    recall = confusion.diag() / support.clamp(min=1)
    present = (support > 0).nonzero().flatten()
    worst = present[recall[present].argsort(stable=True)[:top]].tolist()
    lines.append("the labels of lowest recall: correct of their examples")
    lines += [f"  {name[i]}: {round(confusion[i, i].item())} of {round(support[i].item())}" for i in worst]
    return "\n".join(lines)
