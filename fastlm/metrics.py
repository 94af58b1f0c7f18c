"""What a run reports: ``metrics.jsonl``, ``loss.png``, model FLOPs utilisation.

``metrics.jsonl`` is appended one line per record, so a kill or a full disk can
tear its last line: on resume a torn last line is dropped with a warning. Any
other line that is not a JSON object with an integer ``step`` is damage from
outside fastlm, and stops the resume with an error naming the file and line.

MFU = achieved model FLOPs/s (``ModelConfig.flops_per_token`` x tokens/s) over
the device's peak dense bf16 tensor FLOPs, looked up by device name in
:data:`PEAK_BF16_FLOPS`. Unknown devices and CPUs report no MFU rather than a
guess.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from .files import atomic_write, fault_point, writing

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
