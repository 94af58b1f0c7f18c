"""The numeric rule (kernels/numerics.py), and the self-check applying it as the tests do."""

import torch

from kernels import numerics, selfcheck

TORCH_ERR = 2.0**-7  # exact in fp16


def _judge(op, out_err, grad_err):
    """The self-check's verdict on one fp16 output and one gradient with these errors against the golden zeros."""
    zero = torch.zeros(4)
    got = ([zero + out_err], [zero + grad_err])
    same = ([(zero + TORCH_ERR).half()], [(zero + TORCH_ERR).half()])
    err, torch_err, bound = selfcheck._judge(op, torch.float16, got, ([zero], [zero]), same)
    return err <= bound


def test_attention_gradients_get_3x_everything_else_2x():
    assert numerics.factor("attention", gradient=False) == 2.0
    assert numerics.factor("attention", gradient=True) == 3.0
    for op in ("layer_norm", "rms_norm", "add_rms_norm", "cross_entropy", "linear_cross_entropy"):
        assert numerics.factor(op, gradient=False) == numerics.factor(op, gradient=True) == 2.0


def test_selfcheck_judges_each_tensor_by_the_tests_rule():
    beyond_2x = 2 * TORCH_ERR + numerics.ATOL[torch.float16] * 1.5  # over 2x + atol, within 3x + atol
    assert _judge("attention", 0.0, beyond_2x)  # an attention gradient gets 3x
    assert not _judge("attention", beyond_2x, 0.0)  # its output 2x
    assert not _judge("rms_norm", 0.0, beyond_2x)  # every other gradient 2x
