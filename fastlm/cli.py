"""``fastlm train``, ``fastlm sample``, ``fastlm export``, ``fastlm presets``.

Any config field can be overridden on the command line, as ``--n_layer 4``,
``--n-layer=4`` or ``--set n_layer=4``; a boolean field alone (``--compile``)
means true. Errors in what the user asked for print one clear message and exit
with status 2; failures while running exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from .checkpoint import CheckpointError, list_checkpoints
from .config import PRESETS, Config, ConfigError, describe_fields, preset
from .data import DataError

USAGE_ERRORS = (ConfigError, DataError)
_BOOL_WORDS = {"true", "false", "1", "0", "yes", "no", "on", "off"}


def _parse_overrides(cfg: Config, pairs: list[str], rest: list[str]) -> dict[str, str]:
    """Field overrides from ``--set k=v`` pairs and leftover ``--field [value]`` arguments, applied to ``cfg``."""
    given: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects FIELD=VALUE, got {pair!r}")
        name, value = pair.split("=", 1)
        given[name.strip().replace("-", "_")] = value
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}")
        name, has_value, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        is_bool = isinstance(getattr(cfg.section_of(name), name), bool)  # unknown name: lists the valid ones
        following = rest[i + 1] if i + 1 < len(rest) else None
        if not has_value:
            if is_bool and (following is None or following.lower() not in _BOOL_WORDS):
                value = "true"  # a bare flag: --compile
            elif following is not None and not following.startswith("--"):
                value, i = following, i + 1
            else:
                raise ConfigError(f"--{name} needs a value")
        given[name] = value
        i += 1
    for name, value in given.items():
        cfg.set(name, value)
    cfg.validate()
    return given


def _train(args: argparse.Namespace, rest: list[str]) -> int:
    from . import distributed
    from .train import find_checkpoint, train

    if args.resume:
        if args.preset or args.out or args.overwrite:
            raise ConfigError("--resume continues a run with its own config and directory; "
                              "drop --preset/--out/--overwrite")
        run_dir, checkpoint = find_checkpoint(args.resume)
        cfg = Config.from_dict(json.loads((run_dir / "config.json").read_text()))
    else:
        cfg = preset(args.preset or "tiny")
        checkpoint = None
    if args.init_from:
        if args.resume:
            raise ConfigError("--init-from starts a new run; it cannot be combined with --resume")
        from .hf import read_model_config

        cfg.model = read_model_config(args.init_from)  # the checkpoint's shape; the preset's training recipe
    if args.data is not None:
        cfg.train.data = str(Path(args.data).expanduser().resolve())
    _parse_overrides(cfg, args.set, rest)
    if not args.resume:
        run_dir = Path(args.out or f"runs/{args.preset or 'tiny'}-{time.strftime('%Y%m%d-%H%M%S')}")

    try:
        with distributed.process_group(cfg):  # under torchrun: one process per GPU (or CPU slot)
            result = train(cfg, run_dir, resume_from=checkpoint, overwrite=args.overwrite,
                           progress=not args.quiet, init_from=args.init_from)
    except CheckpointError as e:
        others = [str(p) for p in list_checkpoints(run_dir) if p != checkpoint]
        hint = f"\nother checkpoints of this run: {', '.join(others)} (pass one to --resume)" if others else ""
        raise CheckpointError(f"{e}{hint}") from None

    if not distributed.is_main():
        return 0
    if result.val_loss is None:
        print(f"{run_dir} already finished its {result.step} steps; nothing to do")
        return 0
    print(f"trained to step {result.step} in {result.seconds:.0f} s ({result.tokens_per_sec:,.0f} tokens/s); "
          f"final train loss {result.loss:.3f}, val loss {result.val_loss:.3f} "
          f"(ln(vocab_size) = {math.log(cfg.model.vocab_size):.3f})")
    print(f"run directory: {run_dir}\nsample from it: fastlm sample --run {run_dir} --prompt 'class'")
    return 0


def _sample(args: argparse.Namespace) -> int:
    import kernels
    import torch

    from .generate import complete, load_run

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    checkpoint = args.checkpoint
    if checkpoint is not None and checkpoint.isdigit():
        matches = [p for p in list_checkpoints(args.run) if int(p.name.split("_")[1]) == int(checkpoint)]
        if not matches:
            raise CheckpointError(f"run {args.run} has no checkpoint for step {checkpoint}; it has: "
                                  f"{', '.join(p.name for p in list_checkpoints(args.run)) or 'none'}")
        checkpoint = matches[0]
    model, tokenizer, _ = load_run(args.run, checkpoint, device)
    prompt = args.prompt.encode().decode("unicode_escape") if args.escapes else args.prompt
    with kernels.use_backend(args.backend):
        texts = complete(model, tokenizer, prompt, args.max_new_tokens, num_samples=args.num_samples,
                         temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                         seed=args.seed, use_cache=not args.no_cache)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} ---")
        print(text)
    return 0


def _export(args: argparse.Namespace) -> int:
    from .generate import load_run
    from .hf import export_model
    from .tokenizer import eot_id

    model, tokenizer, _ = load_run(args.run, args.checkpoint)
    out = export_model(model, args.to, tokenizer_json=args.run / "tokenizer.json", eos_token_id=eot_id(tokenizer),
                       overwrite=args.overwrite)
    print(f"exported {args.run} to {out}; load it with transformers.AutoModelForCausalLM.from_pretrained('{out}')")
    return 0


def _presets() -> int:
    for name, cfg in PRESETS.items():
        m = cfg.model
        print(f"{name:<12} {m.num_params() / 1e6:8.1f}M params  {m.n_layer} layers, d={m.n_embd}, "
              f"{m.n_head} heads ({m.kv_heads} kv), {m.norm}, {m.mlp}, {m.position} positions, "
              f"vocab {m.vocab_size}, context {m.block_size}")
    print("\noverridable fields (--NAME VALUE or --set NAME=VALUE):\n" + describe_fields())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastlm", description="Train and sample small language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train a model (any config field can be overridden: --NAME VALUE)",
                        epilog="fields:\n" + describe_fields(), formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("--preset", help=f"named config: {', '.join(PRESETS)} (default tiny)")
    tr.add_argument("--data", help="a text file or folder (default: the Python standard library's source)")
    tr.add_argument("--out", help="run directory (default runs/PRESET-TIMESTAMP)")
    tr.add_argument("--resume", metavar="RUN_DIR", help="continue a run (or one of its checkpoint directories)")
    tr.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    tr.add_argument("--init-from", "--init_from", metavar="HF_DIR",
                    help="start from a Hugging Face GPT-2/Llama checkpoint directory (its shape, weights, tokenizer)")
    tr.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")

    sa = sub.add_parser("sample", help="generate text from a trained run")
    sa.add_argument("--run", required=True, type=Path, help="run directory")
    sa.add_argument("--checkpoint", help="a checkpoint directory or step (default: the latest)")
    sa.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    sa.add_argument("--escapes", action="store_true", help=r"interpret \n and \t in the prompt")
    sa.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=200)
    sa.add_argument("--temperature", type=float, default=0.8)
    sa.add_argument("--top_k", "--top-k", type=int, default=50, help="0 disables")
    sa.add_argument("--top_p", "--top-p", type=float, default=0.95)
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--num_samples", "--num-samples", type=int, default=1)
    sa.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sa.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"])
    sa.add_argument("--no_cache", "--no-cache", action="store_true", help="recompute the context every step")

    ex = sub.add_parser("export", help="write a run's model as a Hugging Face checkpoint (config.json + safetensors)")
    ex.add_argument("--run", required=True, type=Path, help="run directory")
    ex.add_argument("--checkpoint", type=Path, help="a checkpoint directory (default: the latest)")
    ex.add_argument("--to", required=True, type=Path, help="output directory (must be new or empty)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing export directory")

    sub.add_parser("presets", help="list the presets and the config fields")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command != "train" and rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "train":
            return _train(args, rest)
        if args.command == "sample":
            return _sample(args)
        if args.command == "export":
            return _export(args)
        return _presets()
    except USAGE_ERRORS as e:
        print(f"fastlm: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, RuntimeError, OSError, ValueError) as e:
        print(f"fastlm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fastlm: interrupted; resume from the last checkpoint with --resume RUN_DIR", file=sys.stderr)
        return 130
