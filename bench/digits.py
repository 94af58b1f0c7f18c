"""A digit-sensitive seq2seq task trained with the tokenizer's digits merged by BPE and split one per token.

    python -m bench.digits                  # both recipes, one after the other
    python -m bench.digits --only split     # one of them
    python -m bench.digits --steps 300 --examples 2000

The task writes an integer with thousands separators: ``"4821307"`` -> ``"4,821,307"``
(1 to 7 digits, each length equally likely). Where a comma goes
depends on the number's length and on each digit's position from the right, so a model
must read a number digit by digit. With BPE's merged digit runs (``split_digits=False``,
the recipe before single-digit pre-tokens) the tokens of ``48213`` (say ``482`` + ``13``)
do not line up with the groups of the target (``48`` ``,`` ``213``), and each merged run's
digits must be learnt token by token.

Both runs train the same encoder-decoder (2 + 2 layers, 64 wide) through
:func:`fastlm.train.train` on the same examples with the same seed; only the tokenizer
(trained on the task's training split, as every seq2seq run's is) differs. Each runs in
a temporary run directory and token cache (``FASTLM_CACHE``), so nothing of the user's
is touched. Printed: validation exact match of greedy decodes, the teacher-forced
validation loss per target token (not comparable between the two: the tokens differ) and
in bits per byte of target text (comparable), tokens per target, and the time.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import tempfile
import time
from pathlib import Path

from fastlm import data as data_lib
from fastlm import taskdata
from fastlm.metrics import bits_per_byte
from fastlm.config import Config, ModelConfig, TrainConfig
from fastlm.tokenizer import load_tokenizer, train_tokenizer
from fastlm.train import train


VAL_FRACTION = 0.1


def with_separators(number: str) -> str:
    return f"{int(number):,}"


def write_examples(path: Path, count: int, seed: int) -> Path:
    """``count`` lines of ``{"source": "4821307", "target": "4,821,307"}``: numbers of 1-7 digits."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(count):
            digits = rng.randint(1, 7)
            number = str(rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits))
            f.write(json.dumps({"source": number, "target": with_separators(number)}) + "\n")
    return path


def config(data: Path, steps: int, seed: int) -> Config:
    return Config(ModelConfig(vocab_size=512, block_size=16, n_layer=2, n_encoder_layer=2, n_head=4, n_embd=64),
                  TrainConfig(task="seq2seq", data=str(data), seq_len=16, target_len=16, batch_size=32,
                              max_steps=steps, lr=3e-3, min_lr=3e-4, warmup_steps=30, val_fraction=VAL_FRACTION,
                              eval_interval=steps, eval_batches=4, log_interval=50, save_interval=steps,
                              backend="reference", seed=seed)).validate()


@contextlib.contextmanager
def digits_split(split: bool):
    """Runs in this block train their tokenizer with ``split_digits=split``."""
    real = data_lib.train_tokenizer
    data_lib.train_tokenizer = functools.partial(train_tokenizer, split_digits=split)
    try:
        yield
    finally:
        data_lib.train_tokenizer = real


def run(split: bool, data: Path, steps: int, seed: int, work: Path) -> dict:
    run_dir = work / ("split" if split else "merged")
    os.environ["FASTLM_CACHE"] = str(work / f"cache-{run_dir.name}")
    started = time.perf_counter()
    with digits_split(split):
        result = train(config(data, steps, seed), run_dir, progress=False)
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    val = taskdata.split_examples(taskdata.load_seq2seq(str(data)), VAL_FRACTION, stratify=False)[1]
    tokens = sum(len(tokenizer.encode(e.target).ids) + 1 for e in val)  # the end token is a loss term too
    return {"digits": "split" if split else "merged (before)", "exact_match": result.evals["val_exact_match"],
            "val_loss_per_token": result.val_loss,
            "val_bpb": bits_per_byte(result.val_loss, tokens, sum(len(e.target.encode()) for e in val)),
            "tokens_per_target": tokens / len(val) - 1, "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("merged", "split"), help="run one recipe (default: both)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fastlm-digits-") as tmp:
        work = Path(tmp)
        data = write_examples(work / "numbers.jsonl", args.examples, args.seed)
        cache = os.environ.get("FASTLM_CACHE")
        try:
            rows = [run(split, data, args.steps, args.seed, work) for split in (False, True)
                    if args.only in (None, "split" if split else "merged")]
        finally:
            os.environ.pop("FASTLM_CACHE", None) if cache is None else os.environ.update(FASTLM_CACHE=cache)
    print(f"{args.steps} steps of 32 examples, seed {args.seed}; exact match: the first 128 held-out examples")
    print(f"{'digits':<17} {'exact match':>11} {'val loss/token':>14} {'bits/byte':>9} {'tokens/target':>13} {'time':>6}")
    for r in rows:
        print(f"{r['digits']:<17} {r['exact_match']:>11.3f} {r['val_loss_per_token']:>14.4f} {r['val_bpb']:>9.4f} "
              f"{r['tokens_per_target']:>13.1f} {r['seconds']:>5.0f}s")


if __name__ == "__main__":
    main()
