"""``torch.compile`` on the tiny presets: graph breaks and training step time, eager against compiled.

    python -m bench.train_compile                    # every tiny preset, reference kernels, Inductor
    python -m bench.train_compile --presets tiny --steps 4

For each preset family (GPT-2 ``tiny``, Llama ``tiny-llama``, ``tiny-classify``,
``tiny-seq2seq``): ``torch._dynamo.explain`` of the model's training forward
(graphs and breaks; the trainer compiles with ``fullgraph=True``, so 0 is
required), then the mean time of a training step (forward with loss, backward,
AdamW) over ``--steps`` steps after two warm-up steps, eager and compiled, on the
preset's batch with every row full (fixed shapes: one compilation), on the
kernels' reference backend (CPU) or Triton (GPU).
"""

from __future__ import annotations

import argparse
import time

import torch

import kernels
from fastlm.config import preset
from fastlm.model import build_model
from fastlm.train import make_optimizer

PRESETS = ["tiny", "tiny-llama", "tiny-classify", "tiny-seq2seq"]


def training_inputs(name: str):
    """The preset's config and a training batch of it: (cfg, model arguments), full rows."""
    cfg = preset(name)
    m, t = cfg.model, cfg.train
    m.num_classes = 8  # a classifier's comes from its data
    idx = torch.randint(0, m.vocab_size, (t.batch_size, t.seq_len))
    lens = torch.full((t.batch_size,), t.seq_len)
    tgt = idx[:, :t.target_len]
    return cfg, {"lm": (idx, idx), "classify": (idx, lens, torch.randint(0, 8, (t.batch_size,))),
                 "seq2seq": (idx, lens, tgt, tgt)}[t.task]


def step_ms(cfg, args, device: torch.device, compiled: bool, steps: int) -> tuple[float, float]:
    """(mean ms per step, seconds of the first step) of training ``cfg``'s model on ``args``."""
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.train.task).to(device)
    optimizer = make_optimizer(model, cfg, device)
    forward = torch.compile(model, fullgraph=True) if compiled else model

    def step():
        with kernels.unchecked():
            forward(*args).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1000, first


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated preset names")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name in args.presets.split(","):
        torch.manual_seed(0)
        cfg, inputs = training_inputs(name)
        inputs = tuple(x.to(device) for x in inputs)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(build_model(cfg.model, cfg.train.task).to(device))(*inputs)
        torch._dynamo.reset()
        eager, _ = step_ms(cfg, inputs, device, False, args.steps)
        compiled, first = step_ms(cfg, inputs, device, True, args.steps)
        print(f"{name}: {explained.graph_count} graph(s), {explained.graph_break_count} break(s); step eager "
              f"{eager:.0f} ms, compiled {compiled:.0f} ms (first compiled step {first:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
