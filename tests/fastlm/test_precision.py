"""The one compute-dtype policy (fastlm.precision), and inference following the run's dtype.

No GPU is needed: the policy is a function of the setting and the device's type, and inference on CPU
shows whether it asked the policy (a bfloat16 run autocasts on CPU too, a float32 run never does)."""

import contextlib
import warnings

import pytest
import torch

import kernels
from fastlm import cli
from fastlm.config import ConfigError, ModelConfig, preset
from fastlm.generate import classify, generate, translate
from fastlm.model import GPT, Classifier, Seq2Seq
from fastlm.precision import active_dtype, autocast_context, compute_dtype
from fastlm.tokenizer import EOT, train_tokenizer

MICRO = dict(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=32)


@pytest.mark.parametrize("setting, device, expected", [
    ("auto", "cpu", torch.float32), ("auto", "cuda", torch.bfloat16), ("auto", "cuda:1", torch.bfloat16),
    ("float32", "cpu", torch.float32), ("float32", "cuda", torch.float32),
    ("bfloat16", "cpu", torch.bfloat16), ("bfloat16", "cuda", torch.bfloat16),
])
def test_compute_dtype(setting, device, expected):
    assert compute_dtype(setting, device) == expected
    assert compute_dtype(setting, torch.device(device)) == expected
    cfg = preset("tiny")
    cfg.train.dtype = setting
    assert compute_dtype(cfg, device) == expected  # a whole config answers by its dtype field


def test_an_unknown_dtype_setting_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"dtype must be one of auto, float32, bfloat16, got 'fp16'"):
        compute_dtype("fp16", "cpu")


def test_a_float32_run_on_a_gpu_computes_without_autocast():
    """The autocast chosen for CUDA, built without CUDA (torch only warns that it would be disabled)."""
    assert isinstance(autocast_context("float32", "cuda"), contextlib.nullcontext)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available": the object still says what it would do
        for setting in ("auto", "bfloat16"):
            chosen = autocast_context(setting, torch.device("cuda"))
            assert isinstance(chosen, torch.autocast)
            assert (chosen.device, chosen.fast_dtype) == ("cuda", torch.bfloat16)
    assert isinstance(autocast_context("auto", "cpu"), contextlib.nullcontext)


def test_active_dtype_is_autocasts_where_it_is_on():
    x = torch.zeros(2)
    assert active_dtype(x) == torch.float32
    with autocast_context("bfloat16", "cpu"):
        assert active_dtype(x) == torch.bfloat16
    assert active_dtype(x.double()) == torch.float64


def _record_precision(model):
    """The autocast dtype (False: none) each forward of the model or of any of its modules ran under."""
    seen = []
    for module in model.modules():  # the encoder-decoder decodes through its modules, not its forward
        module.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")
                                                                and torch.get_autocast_dtype("cpu")))
    return seen


def _tokenizer():
    return train_tokenizer(["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 20, 300)


@pytest.mark.parametrize("setting, expected", [("float32", False), ("bfloat16", torch.bfloat16)])
def test_inference_computes_in_the_dtype_it_is_given(setting, expected):
    torch.manual_seed(0)
    tok = _tokenizer()
    gpt, classifier = GPT(ModelConfig(**MICRO)).eval(), Classifier(ModelConfig(**MICRO, num_classes=2)).eval()
    seq2seq = Seq2Seq(ModelConfig(**MICRO)).eval()
    seen = [_record_precision(m) for m in (gpt, classifier, seq2seq)]
    with kernels.use_backend("reference"):
        generate(gpt, [1, 2], 3, dtype=setting)
        classify(classifier, tok, ["a", "b"], ["def f"], max_len=8, dtype=setting)
        translate(seq2seq, tok, ["def f"], max_new_tokens=2, max_source_len=8, beam_size=1, dtype=setting)
    assert all(seen)
    assert all(s == expected for s in seen[0] + seen[1] + seen[2])


def test_fastlm_sample_runs_in_the_runs_dtype(monkeypatch, capsys):
    """fastlm sample passes the run's TrainConfig.dtype: a bfloat16 run autocasts (on CPU too), a float32
    run does not (on a GPU it used to sample in bf16 whatever the run trained in)."""
    torch.manual_seed(0)
    tok = _tokenizer()
    assert tok.token_to_id(EOT) is not None
    for setting, expected in (("bfloat16", torch.bfloat16), ("float32", False)):
        cfg = preset("tiny")
        cfg.train.dtype = setting
        model = GPT(ModelConfig(**MICRO)).eval()
        seen = _record_precision(model)
        monkeypatch.setattr(cli, "_load", lambda args, task: (model, tok, cfg))
        assert cli.main(["sample", "--run", "unused", "--max_new_tokens", "2", "--backend", "reference"]) == 0
        assert seen and all(s == expected for s in seen)
    capsys.readouterr()
