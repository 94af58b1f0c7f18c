"""``fastlm train`` (any task), ``fastlm train-classifier``, ``fastlm sample``, ``fastlm classify``,
``fastlm translate``, ``fastlm export``, ``fastlm presets``.

Any config field can be overridden on the command line, as ``--n_layer 4``,
``--n-layer=4`` or ``--set n_layer=4``; a boolean field alone (``--compile``)
means true. Errors in what the user asked for print one clear message and exit
with status 2; failures while running exit with status 1; Ctrl-C prints
"interrupted" and exits with status 130. Importing this module loads no torch:
that happens inside :func:`main`, where an interrupt is handled.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable

# CPU training runs many short parallel ops. With OpenMP's default of spinning between them, two
# threads ran 3-5x slower than one whenever another process shared our 2 cores; with threads that
# sleep, two were faster than one. OpenMP reads this when torch loads it, so it is set here, before
# the first import of torch, by the program alone (importing fastlm as a library changes nothing);
# an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import EMPTY_DATA, MAX_SEED, PRESETS, Config, ConfigError, TrainConfig, describe_fields, preset

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
    from .rundir import default_run_dir, find_checkpoint
    from .tasks import TASKS, make_task
    from .train import train

    if args.resume:
        if args.preset or args.out or args.overwrite or (args.task and args.command == "train"):
            raise ConfigError("--resume continues a run with its own config and directory; "
                              "drop --preset/--out/--overwrite/--task")
        run_dir, checkpoint = find_checkpoint(args.resume)
        cfg = Config.from_file(run_dir / "config.json")  # checked against what the checkpoint recorded by train()
    else:
        args.preset = args.preset or TASKS[args.task or TrainConfig.task].default_preset
        cfg = preset(args.preset)
        if args.task:
            cfg.train.task = args.task
        checkpoint = None
    if args.init_from:
        if args.resume:
            raise ConfigError("--init-from starts a new run; it cannot be combined with --resume")
        from .hf import read_model_config

        cfg.model = read_model_config(args.init_from)  # the checkpoint's shape; the preset's training recipe
    if args.data is not None:
        cfg.train.data = _data_path(args.data)
    if _parse_overrides(cfg, args.set, rest).get("data") is not None and cfg.train.data is not None:
        cfg.train.data = _data_path(cfg.train.data)  # --set data=PATH, kept as --data's is
    if args.command == "train-classifier" and cfg.train.task != "classify":  # overridden, or a resumed run's
        raise ConfigError(f"train-classifier trains task classify; got task {cfg.train.task!r} "
                          "(use fastlm train for the others)")
    if not args.resume:
        run_dir = Path(args.out) if args.out else default_run_dir(args.preset)

    from .checkpoint import CheckpointError, list_checkpoints

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
          f"final train loss {result.loss:.3f}, val loss {result.val_loss:.3f}", end="")
    task = make_task(cfg)
    print(task.report(result.evals, run_dir))
    print(f"run directory: {run_dir}\n" + task.usage.format(run=run_dir))
    return 0


def _user_path(text: str) -> Path:
    """A path flag's value, ``~`` the home directory (a shell leaves ``--out=~/x`` and a quoted ``~`` as they are);
    an empty one (``--out "$DIR"`` with DIR unset) is an error, not the working directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return Path(text).expanduser()


def _data_path(text: str) -> str:
    """The data path as the run records it: absolute, so that the run resumes from any working directory."""
    if not text.strip():
        raise ConfigError(EMPTY_DATA)
    return str(_user_path(text).resolve())


def _text(name: str, text: str, escapes: bool) -> str:
    """An input text given as ``name`` (a flag, or which text), its escapes interpreted if ``escapes``; an error
    naming it when an escape is malformed or the text is not UTF-8 (bytes that are not reach Python's
    arguments as lone surrogates, which no tokenizer takes)."""
    if escapes:
        try:
            text = _unescape(text)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{name} with --escapes: {e.reason} (a backslash starts an escape such as \\n; "
                              "write \\\\ for a backslash)") from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{name} is not valid UTF-8 text (is the terminal's encoding another?): "
                          f"{text!r:.60}") from None
    return text


def _sample(args: argparse.Namespace) -> int:
    import kernels

    from .generate import complete

    prompt = _text("--prompt", args.prompt, args.escapes)
    model, tokenizer, cfg = _load(args, "lm")
    with kernels.use_backend(args.backend):
        texts = complete(model, tokenizer, prompt, args.max_new_tokens, num_samples=args.num_samples,
                         temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                         seed=args.seed, use_cache=not args.no_cache, dtype=cfg.train.dtype)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} ---")
        print(text)
    return 0


def _inputs(args: argparse.Namespace) -> list[str]:
    """The texts to run on: the arguments, or with ``-`` (or none), one per line of standard input."""
    texts = args.text
    if not texts or texts == ["-"]:
        if sys.stdin.isatty():
            raise ConfigError("give the texts as arguments, or pipe them in one per line")
        try:
            texts = sys.stdin.read().rstrip("\n").split("\n")  # one output line per input line, blank ones refused
        except UnicodeDecodeError as e:
            raise ConfigError(f"standard input is not valid UTF-8 text ({e.reason} at byte {e.start})") from None
    texts = [_text(f"text {i + 1}", t, args.escapes) for i, t in enumerate(texts)]
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise ConfigError(f"text {empty[0] + 1} is empty; every input needs some text")
    return texts


def _unescape(text: str) -> str:
    """``\\n``, ``\\t`` and other backslash escapes interpreted; other characters (non-ASCII too) kept."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def _classify(args: argparse.Namespace) -> int:
    import kernels

    from .generate import classify
    from .rundir import read_labels

    if args.top < 1:
        raise ConfigError(f"--top must be at least 1, got {args.top}")
    texts = _inputs(args)
    model, tokenizer, cfg = _load(args, "classify")
    labels = read_labels(args.run)
    with kernels.use_backend(args.backend):
        results = classify(model, tokenizer, labels, texts, max_len=cfg.train.seq_len, dtype=cfg.train.dtype)
    for text, probs in zip(texts, results):
        top = list(probs.items())[:args.top]
        shown = text if len(text) <= 60 else text[:57] + "..."
        print(f"{top[0][0]}\t" + "  ".join(f"{label} {p:.3f}" for label, p in top) + f"\t{shown!r}")
    return 0


def _translate(args: argparse.Namespace) -> int:
    import kernels

    from .generate import translate

    if args.beam < 1:
        raise ConfigError(f"--beam must be at least 1, got {args.beam}")
    texts = _inputs(args)
    model, tokenizer, cfg = _load(args, "seq2seq")
    limit = cfg.model.block_size
    max_new = cfg.train.target_len if args.max_new_tokens is None else args.max_new_tokens
    if not 1 <= max_new <= limit:
        raise ConfigError(f"--max-new-tokens must be in [1, {limit}] (the model's block_size), got {max_new}")
    with kernels.use_backend(args.backend):
        outputs = translate(model, tokenizer, texts, max_new_tokens=max_new, max_source_len=cfg.train.seq_len,
                            beam_size=args.beam, length_penalty=args.length_penalty, dtype=cfg.train.dtype)
    for text in outputs:
        print(text.replace("\n", "\\n"))  # one line per input
    return 0


def _load(args: argparse.Namespace, task: str):
    """The model, tokenizer and config of ``--run`` (at ``--checkpoint``) on ``--device``, which must
    have trained ``task``."""
    import torch

    from .rundir import checkpoint_at, load_run

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available (use --device cpu or auto)")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return load_run(args.run, checkpoint_at(args.run, args.checkpoint), device, task=task)


def _export(args: argparse.Namespace) -> int:
    from .hf import export_model
    from .rundir import checkpoint_at, load_run
    from .tokenizer import eot_id

    model, tokenizer, _ = load_run(args.run, checkpoint_at(args.run, args.checkpoint), task="lm")
    out = export_model(model, args.to, tokenizer_json=args.run / "tokenizer.json", eos_token_id=eot_id(tokenizer),
                       overwrite=args.overwrite, source_run=args.run)
    print(f"exported {args.run} to {out}; load it with transformers.AutoModelForCausalLM.from_pretrained('{out}')")
    return 0


def _presets() -> int:
    import torch

    from .model import build_model

    for name, cfg in PRESETS.items():
        m, task = cfg.model, cfg.train.task
        with torch.device("meta"):  # counted from the real modules, nothing allocated
            shape = Config.from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "num_classes": 2}}).model
            params = sum(p.numel() for p in build_model(shape, task).parameters())
        layers = f"{m.encoder_layers}+{m.n_layer}" if task == "seq2seq" else str(m.n_layer)
        print(f"{name:<14} {task:<8} {params / 1e6:8.1f}M params  {layers} layers, d={m.n_embd}, "
              f"{m.n_head} heads ({m.kv_heads} kv), {m.norm}, {m.mlp}, {m.position} positions, "
              f"vocab {m.vocab_size}, context {m.block_size}")
    print("\noverridable fields (--NAME VALUE or --set NAME=VALUE):\n" + describe_fields())
    return 0


def _number(kind: type, expected: str, ok: Callable) -> Callable[[str], int | float]:
    """An argparse type: ``text`` parsed as ``kind`` and accepted when ``ok(value)``; argparse's error names
    the flag and says ``expected``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):  # NaN fails every comparison, so no bound lets it through
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


CHECKPOINT_HELP = "a checkpoint: its step, its name (step_00000500) or its directory (default: the latest)"
POSITIVE_INT = _number(int, "an integer >= 1", lambda v: v >= 1)
SEED = _number(int, f"an integer in [0, {MAX_SEED}]", lambda v: 0 <= v <= MAX_SEED)


def _train_parser(sub, command: str) -> None:
    if command == "train":
        tr = sub.add_parser("train", help="train a model (any config field can be overridden: --NAME VALUE)",
                            epilog="fields:\n" + describe_fields(), formatter_class=argparse.RawDescriptionHelpFormatter)
        tr.add_argument("--task", choices=["lm", "classify", "seq2seq"],
                        help="lm: language model (default); classify: text -> label; seq2seq: text -> text")
    else:
        tr = sub.add_parser("train-classifier", help="train a text classifier (fastlm train --task classify)")
        tr.set_defaults(task="classify")
    tr.add_argument("--preset", help=f"named config: {', '.join(PRESETS)} (default: tiny, tiny-classify or "
                                     "tiny-seq2seq, by task)")
    tr.add_argument("--data", help="lm: a text file or folder; classify: a .csv or .jsonl of text,label; seq2seq: "
                                   "a .jsonl (or .csv) of source,target (default: the task's built-in data set, "
                                   "made from the Python standard library)")
    tr.add_argument("--out", type=_user_path, help="run directory (default runs/PRESET-TIMESTAMP)")
    tr.add_argument("--resume", metavar="RUN_DIR", type=_user_path,
                    help="continue a run (or one of its checkpoint directories)")
    tr.add_argument("--overwrite", action="store_true",
                    help="replace an existing run directory (only fastlm's own files in it are deleted)")
    tr.add_argument("--init-from", "--init_from", metavar="HF_DIR", type=_user_path,
                    help="start from a Hugging Face GPT-2/Llama checkpoint directory (its shape, weights, tokenizer)")
    tr.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastlm", description="Train and sample small language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    for command in ("train", "train-classifier"):
        _train_parser(sub, command)
    sa = sub.add_parser("sample", help="generate text from a trained run")
    sa.add_argument("--run", required=True, type=_user_path, help="run directory")
    sa.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    sa.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    sa.add_argument("--escapes", action="store_true", help=r"interpret \n and \t in the prompt")
    sa.add_argument("--max_new_tokens", "--max-new-tokens", type=POSITIVE_INT, default=200)
    sa.add_argument("--temperature", type=_number(float, "a finite number >= 0 (0: greedy)",
                                                  lambda v: 0 <= v < math.inf), default=0.8)
    sa.add_argument("--top_k", "--top-k", type=_number(int, "an integer >= 0 (0 disables)", lambda v: v >= 0),
                    default=50, help="0 disables")
    sa.add_argument("--top_p", "--top-p", type=_number(float, "a number in (0, 1]", lambda v: 0 < v <= 1),
                    default=0.95)
    sa.add_argument("--seed", type=SEED, default=0)
    sa.add_argument("--num_samples", "--num-samples", type=POSITIVE_INT, default=1)
    sa.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sa.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"])
    sa.add_argument("--no_cache", "--no-cache", action="store_true", help="recompute the context every step")

    ex = sub.add_parser("export", help="write a run's model as a Hugging Face checkpoint (config.json + safetensors)")
    ex.add_argument("--run", required=True, type=_user_path, help="run directory")
    ex.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    ex.add_argument("--to", required=True, type=_user_path, help="output directory (must be new or empty)")
    ex.add_argument("--overwrite", action="store_true", help="replace an earlier export in that directory")

    for command, help_text in (("classify", "predict labels with a trained classifier run"),
                               ("translate", "decode target texts with a trained seq2seq run")):
        p = sub.add_parser(command, help=help_text)
        p.add_argument("--run", required=True, type=_user_path, help="run directory")
        p.add_argument("text", nargs="*", help="input texts (none or '-': one per line of standard input)")
        p.add_argument("--checkpoint", help=CHECKPOINT_HELP)
        p.add_argument("--escapes", action="store_true", help=r"interpret \n and \t in the texts")
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        p.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"])
        if command == "classify":
            p.add_argument("--top", type=int, default=3, help="labels shown per text, most likely first")
        else:
            p.add_argument("--beam", type=int, default=4, help="beam size (1: greedy)")
            p.add_argument("--length_penalty", "--length-penalty", default=1.0,
                           type=_number(float, "a finite number", math.isfinite),
                           help="beam search ranks finished targets by score / length ** this")
            p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, help="default: the run's target_len")

    sub.add_parser("presets", help="list the presets and the config fields")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        parser = build_parser()
        args, rest = parser.parse_known_args(argv)
        return _run(parser, args, rest)
    except KeyboardInterrupt:  # at any point, start-up (loading torch, the data) included
        training = args is not None and args.command in ("train", "train-classifier")
        print("fastlm: interrupted" + ("; continue the run with --resume RUN_DIR from its last checkpoint, if it "
                                       "saved one" if training else ""), file=sys.stderr)
        return 130


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError

    try:
        if args.command not in ("train", "train-classifier") and rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command in ("train", "train-classifier"):
            return _train(args, rest)
        if args.command == "sample":
            return _sample(args)
        if args.command == "classify":
            return _classify(args)
        if args.command == "translate":
            return _translate(args)
        if args.command == "export":
            return _export(args)
        return _presets()
    except (ConfigError, DataError) as e:  # what the user asked for
        print(f"fastlm: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the output was piped into a reader that stopped early (head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except MemoryError:
        print("fastlm: error: out of memory; a smaller batch_size, model or --num_samples needs less",
              file=sys.stderr)
        return 1
    except (CheckpointError, RuntimeError, OSError, ValueError) as e:
        print(f"fastlm: error: {e}", file=sys.stderr)
        return 1
