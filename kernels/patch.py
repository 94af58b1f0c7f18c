"""``patch(model)``: put the fused kernels into a model that was not written for them.

- Norms: every ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` becomes its
  :mod:`kernels.nn` subclass in place (same object, same parameters, so an
  optimizer built before patching keeps working); Hugging Face's own RMSNorm
  modules (``LlamaRMSNorm``, ``Qwen2RMSNorm``, ``GemmaRMSNorm``, ...: a ``weight``
  and a ``variance_epsilon`` or ``eps``) are replaced by a :class:`kernels.nn.RMSNorm`
  holding the same ``weight`` Parameter, after probes show they compute the same
  function: with Gemma's ``offset=1.0`` (it stores ``w`` and scales by ``1 + w``)
  where that is what they compute, and the ``casting_mode`` ("llama", "gemma") that
  rounds where they round.
- Gated MLPs: a module with ``gate_proj``, ``up_proj`` and ``down_proj`` children
  (``LlamaMLP``, ``MistralMLP``, ``Qwen2MLP``, ``GemmaMLP``, ``Gemma2MLP``, ...) whose
  forward a probe shows to be ``down_proj(act(gate_proj(x)) * up_proj(x))`` becomes a
  :class:`kernels.nn.GatedMLP` holding the same three projections (same Parameters,
  same state-dict names): SiLU runs :func:`kernels.swiglu`, tanh GELU
  (``gelu_pytorch_tanh``) and exact GELU :func:`kernels.geglu`. Any other activation, or
  another forward, is left as is and reported.
- RoPE, for the Llama, Mistral, Qwen2, Gemma and Gemma 2 families: their attention
  modules call the module-level ``apply_rotary_pos_emb`` of their modeling module. That
  function is replaced, once per modeling module, by one that runs :func:`kernels.rope`
  (``unsqueeze_dim`` 1 or 2) only inside the forward of an attention module that was
  patched (a thread-local switch set by that module's forward) and the original everywhere
  else, so an unpatched model of the same family in the same process computes as before.
  These families rotate the whole head dim (their rotary modules ignore a
  ``partial_rotary_factor``); tables narrower than the head, or tables that require
  grad, go to the original function too.
- Attention, for ``transformers`` causal LMs of the GPT-2, Llama, Mistral, Qwen2,
  Gemma and Gemma 2 families: the model's attention implementation is set to
  ``"fastlm"``, registered in transformers' ``AttentionInterface``. Without padding it
  runs :func:`kernels.attention` with ``causal=True``; a right-padding mask becomes
  ``kv_lens``; a layer's ``sliding_window`` w becomes ``window_size=(w - 1, 0)`` (w
  keys, the query's own included, as transformers' mask) and Gemma 2's attention
  softcap ``softcap``. Packed sequences run :func:`kernels.varlen_attention`: the
  ``cu_seq_lens_q/k`` and ``max_length_q/k`` keyword arguments of transformers'
  ``DataCollatorWithFlattening`` (taken as given, as transformers' flash-attention
  path takes them; also under ``torch.compile``, where maxima given as tensors are not
  read and the grid covers the packed length), or the mask transformers builds from position_ids that restart
  at 0 (without a cache, ``use_cache=False``; recognised from the mask, one host sync
  per layer). Any other mask, dropout in training, or an option the kernel lacks runs
  transformers' SDPA path (its eager path for a model with a softcap, which SDPA
  lacks), with a warning the first time each reason occurs (none while ``torch.compile``
  traces: a warning would break the graph). So does any mask under ``torch.compile``
  (reading it would break the graph), and transformers builds one while compiling unless
  a cache lets it prove the batch plain causal: compile a patched model with
  ``use_cache=True`` (transformers' default) for the fused attention.
- Loss, same families: in training mode, a forward with ``labels`` computes the
  loss with :func:`kernels.linear_cross_entropy` from the final hidden states
  (labels shifted exactly as transformers' ``ForCausalLMLoss``, ``num_items_in_batch``
  honoured) and returns ``logits=None``: the (tokens x vocab) logits are never
  materialised. In eval mode, or without labels, the model's own forward runs
  and returns logits as usual. Gemma 2's final-logit cap (``final_logit_softcapping``) is
  the fused loss's ``softcap``.

Patching is idempotent, and a patched model deep-copies and pickles whole, still patched. What was asked for and could not be patched is listed in
``model.kernels_patch_report`` and in one warning.
"""

from __future__ import annotations

import copy
import functools
import inspect
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import nn as fused
from . import reference
from .attention import MAX_HEAD_DIM, attention, varlen_attention
from ._library import autocast_dtype
from .cross_entropy import linear_cross_entropy
from .reference.attention import visibility
from .rope import rope

ATTN_IMPLEMENTATION = "fastlm"
SUPPORTED_FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "gemma", "gemma2")
ROPE_FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gemma2")

_warned: set[str] = set()


@dataclass
class PatchReport:
    """What :func:`patch` changed (``patched``) and what it was asked to change but could not (``not_patched``)."""

    patched: list[str] = field(default_factory=list)
    not_patched: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"patched: {p}" for p in self.patched] + [f"NOT patched: {p}" for p in self.not_patched]
        return "\n".join(lines) or "nothing to patch"


class _Method(functools.partial):
    """``types.MethodType(function, owner)`` that pickle and ``copy.deepcopy`` follow into a copy.

    A patched module's own ``forward`` is one of these: pickle stores a bound method by name
    (``getattr(owner, "forward")``), which the copy resolves to its class's unpatched forward (or
    fails to find); a partial of a module-level function pickles the function by reference and
    the owner with the rest of the model.
    """

    @property
    def __func__(self):
        return self.func

    @property
    def __self__(self):
        return self.args[0]


def patch(model: torch.nn.Module, *, attention: bool = True, norm: bool = True, mlp: bool = True,
          rope: bool = True, loss: bool = True) -> torch.nn.Module:
    """Swap the fused kernels into ``model`` in place and return it; see the module docstring."""
    report = PatchReport()
    if norm:
        _patch_norms(model, report)
    if mlp:
        _patch_gated_mlps(model, report)
    family = _hf_causal_lm_family(model)
    for wanted, name, apply in ((attention, "attention", _patch_attention), (rope, "rope", _patch_rope),
                                (loss, "loss", _patch_loss)):
        if not wanted:
            continue
        if family is None:
            report.not_patched.append(f"{name}: {type(model).__name__} is not a transformers causal LM of a "
                                      f"supported family ({', '.join(SUPPORTED_FAMILIES)}); call kernels.attention / "
                                      "kernels.rope / kernels.linear_cross_entropy from the model's code instead")
        else:
            apply(model, family, report)
    model.kernels_patch_report = report
    if report.not_patched:
        warnings.warn("kernels.patch: " + "; ".join(report.not_patched), stacklevel=2)
    return model


# ----------------------------------------------------------------------------- norms


def _hf_rms_eps(module: torch.nn.Module) -> float | None:
    """The epsilon of a transformers RMSNorm: ``variance_epsilon`` (Llama and most) or ``eps`` (Gemma)."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return eps if isinstance(eps, float) else None


def _run_with_weight(module: torch.nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with ``weight`` in place of its own, on a shallow copy: the model itself is untouched."""
    twin = copy.copy(module)
    twin._parameters = {"weight": torch.nn.Parameter(weight)}
    with torch.no_grad():
        return twin(x)


def _hf_rms_norm_semantics(module: torch.nn.Module) -> tuple[float, str] | None:
    """``(offset, casting_mode)`` of an RMSNorm-like module (one ``weight`` + an epsilon) that computes
    ``rms_norm(x) * (offset + weight)``, or None; probes decide, not the class name.

    An fp32 probe finds the offset (Llama's 0, Gemma's 1 for its stored ``1 + w``): the modes
    agree there, so a module that matches neither is something else. A bf16 probe then finds
    where it rounds: the casting mode whose reference is nearest its output (dtype included).
    """
    weight, eps = getattr(module, "weight", None), _hf_rms_eps(module)
    if isinstance(module, fused.RMSNorm):  # already ours (patched before): nothing to replace
        return None
    if not (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.nn.Parameter)
            and weight.dim() == 1 and eps is not None and weight.device.type != "meta"):
        return None
    if len(list(module.parameters())) != 1 or list(module.buffers()) or list(module.children()):
        return None
    n = weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    probe, w = (torch.randn(shape, generator=generator).to(weight.device) for shape in ((3, n), (n,)))
    got = _run_with_weight(module, w, probe)
    for offset in (0.0, 1.0):
        expected = reference.rms_norm(probe, n, w, eps, offset=offset)
        if got.shape == expected.shape and torch.allclose(got.float(), expected, rtol=1e-4, atol=1e-5):
            break
    else:
        return None
    probe, w = probe.bfloat16(), w.bfloat16()
    got = _run_with_weight(module, w, probe)
    errors = {}
    for mode in reference.norm.CASTING_MODES:
        expected = reference.rms_norm(probe, n, w, eps, offset=offset, casting_mode=mode)
        if got.dtype == expected.dtype and got.shape == expected.shape:
            errors[mode] = (got.float() - expected.float()).abs().max().item()
    return (offset, min(errors, key=errors.get)) if errors else None


def _patch_norms(model: torch.nn.Module, report: PatchReport) -> None:
    counts: dict[str, int] = {}
    unknown: set[str] = set()
    for module in model.modules():  # torch's own norms: swap the class, the object stays
        if isinstance(module, (fused.LayerNorm, fused.RMSNorm)):
            counts.setdefault(type(module).__name__, 0)
        elif type(module) in (torch.nn.LayerNorm, torch.nn.RMSNorm):
            module.__class__ = fused.LayerNorm if type(module) is torch.nn.LayerNorm else fused.RMSNorm
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    replaced: dict[int, torch.nn.Module] = {}  # a module shared by several parents is replaced once
    for parent in list(model.modules()):  # transformers' RMSNorms: a new module holding the same weight
        for name, child in list(parent.named_children()):
            semantics = _hf_rms_norm_semantics(child) if id(child) not in replaced else None
            if semantics is not None:
                offset, casting_mode = semantics
                new = fused.RMSNorm(child.weight.shape[0], eps=_hf_rms_eps(child), device=child.weight.device,
                                    dtype=child.weight.dtype, offset=offset, casting_mode=casting_mode)
                new.weight = child.weight  # the same Parameter: optimizers and tied weights stay valid
                new.train(child.training)
                replaced[id(child)] = new
                counts[type(child).__name__] = counts.get(type(child).__name__, 0) + 1
            if id(child) in replaced:
                setattr(parent, name, replaced[id(child)])
            elif type(child).__name__.endswith(("LayerNorm", "RMSNorm")) and not isinstance(
                    child, (fused.LayerNorm, fused.RMSNorm)):
                unknown.add(type(child).__name__)
    for cls, n in sorted(counts.items()):
        report.patched.append(f"norm: {n} {cls} module(s) run kernels.nn" if n else f"norm: {cls} already fused")
    for cls in sorted(unknown):
        report.not_patched.append(f"norm: {cls} (unknown semantics; left as is)")


# ----------------------------------------------------------------------------- gated MLPs

_GATED_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_GLU_ACTIVATIONS = {"silu": "kernels.swiglu", "gelu_tanh": "kernels.geglu (approximate='tanh')",
                    "gelu": "kernels.geglu (approximate='none')"}


def _gated_mlp_activation(module: torch.nn.Module) -> str | None:
    """The :class:`kernels.nn.GatedMLP` activation of a module with ``gate_proj``/``up_proj``/``down_proj``
    children whose forward is ``down_proj(act(gate_proj(x)) * up_proj(x))``, or None; a probe decides.

    The probe runs the module's own forward on a shallow copy whose projections are small random
    Linears (8 -> 16 -> 8): cheap whatever the model's size, and independent of its weights.
    """
    parameters = list(module.parameters())
    if not parameters or any(p.device.type == "meta" for p in parameters):
        return None
    device = parameters[0].device
    generator = torch.Generator().manual_seed(0)
    hidden, inner = 8, 16

    def probe_linear(n_in: int, n_out: int) -> torch.nn.Linear:
        linear = torch.nn.Linear(n_in, n_out)
        with torch.no_grad():
            for p in linear.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
        return linear.to(device)

    twin = copy.copy(module)
    twin._modules = dict(module._modules)
    twin._modules.update(gate_proj=probe_linear(hidden, inner), up_proj=probe_linear(hidden, inner),
                         down_proj=probe_linear(inner, hidden))
    x = torch.randn(3, hidden, generator=generator).to(device)
    with torch.no_grad():
        try:
            got = twin(x)
        except Exception:  # a forward that needs more than the three projections: not this structure
            return None
        gate, up = twin.gate_proj(x), twin.up_proj(x)
        for activation in _GLU_ACTIVATIONS:
            expected = twin.down_proj(reference.glu.glu(gate, up, activation))
            if torch.is_tensor(got) and got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-5,
                                                                                       atol=1e-6):
                return activation
    return None


def _patch_gated_mlps(model: torch.nn.Module, report: PatchReport) -> None:
    counts: dict[tuple[str, str], int] = {}
    unknown: set[str] = set()
    replaced: dict[int, torch.nn.Module] = {}  # a module shared by several parents is replaced once
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, fused.GatedMLP):
                counts.setdefault(("GatedMLP", child.activation), 0)
                continue
            if id(child) not in replaced and all(n in child._modules for n in _GATED_PROJECTIONS):
                activation = _gated_mlp_activation(child)
                if activation is None:
                    act = getattr(child, "act_fn", None)
                    unknown.add(type(child).__name__ + (f" with {type(act).__name__}" if act is not None else ""))
                    continue
                new = fused.GatedMLP(1, 1, activation, device="meta")  # its projections are the child's own
                for projection in _GATED_PROJECTIONS:
                    setattr(new, projection, getattr(child, projection))  # same Parameters, same state-dict names
                new.train(child.training)
                replaced[id(child)] = new
                key = (type(child).__name__, activation)
                counts[key] = counts.get(key, 0) + 1
            if id(child) in replaced:
                setattr(parent, name, replaced[id(child)])
    for (cls, activation), n in sorted(counts.items()):
        report.patched.append(f"mlp: {n} {cls} module(s) run {_GLU_ACTIVATIONS[activation]}" if n
                              else f"mlp: {cls} already fused ({_GLU_ACTIVATIONS[activation]})")
    for cls in sorted(unknown):
        report.not_patched.append(f"mlp: {cls} (not act(gate_proj(x)) * up_proj(x) with SiLU, tanh GELU or "
                                  "GELU; left as is)")


# ----------------------------------------------------------------------------- RoPE

# ``active`` is True inside the forward of an attention module that kernels.patch patched: only there does
# the replaced apply_rotary_pos_emb run kernels.rope (other models of the same family keep the original).
# Per thread, as a context variable would be, but torch.compile traces an attribute write where
# ContextVar.set() is a graph break.
_ROPE_SWITCH = threading.local()
_ROPE_ARGUMENTS = ("q", "k", "cos", "sin")


def _rope_compatible(function) -> bool:
    """Whether ``function`` has the signature of transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``."""
    names = list(inspect.signature(function).parameters)
    return names[:4] == list(_ROPE_ARGUMENTS) and set(names[4:]) <= {"unsqueeze_dim", "position_ids"}


def _fused_apply_rotary_pos_emb(original):
    """``original`` (a modeling module's ``apply_rotary_pos_emb``) through :func:`kernels.rope` where patched."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def apply_rotary_pos_emb(*args, **kwargs):
        if getattr(_ROPE_SWITCH, "active", False):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            q, k, cos, sin = (bound.arguments[n] for n in _ROPE_ARGUMENTS)
            unsqueeze_dim = bound.arguments.get("unsqueeze_dim", 1)
            if (bound.arguments.get("position_ids") is None and q.dim() == k.dim() == 4 and cos.dim() == 3
                    and unsqueeze_dim in (1, 2) and cos.shape[-1] == q.shape[-1]
                    and not (cos.requires_grad or sin.requires_grad)):
                if unsqueeze_dim == 1:  # (batch, heads, seq, head_dim), as kernels.rope takes them
                    return rope(q, k, cos, sin)
                q_embed, k_embed = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
                return q_embed.transpose(1, 2), k_embed.transpose(1, 2)
        return original(*args, **kwargs)

    apply_rotary_pos_emb._kernels_original = original
    return apply_rotary_pos_emb


def _rope_scoped_forward(self, *args, **kwargs):
    """A patched attention module's forward: its own, with the fused RoPE switched on for its duration."""
    previous = getattr(_ROPE_SWITCH, "active", False)
    _ROPE_SWITCH.active = True
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _ROPE_SWITCH.active = previous


def _patch_rope(model, family: str, report: PatchReport) -> None:
    if family not in ROPE_FAMILIES:
        return  # GPT-2: learned positions, nothing to rotate
    counts: dict[str, int] = {}
    for module in model.modules():
        modeling = sys.modules.get(type(module).__module__)
        function = getattr(modeling, "apply_rotary_pos_emb", None)
        if not (type(module).__name__.endswith("Attention") and callable(function)):
            continue
        if not _rope_compatible(getattr(function, "_kernels_original", function)):
            report.not_patched.append(f"rope: {modeling.__name__}.apply_rotary_pos_emb has an unknown signature; "
                                      "left as is")
            return
        if not hasattr(function, "_kernels_original"):
            modeling.apply_rotary_pos_emb = _fused_apply_rotary_pos_emb(function)
        counts.setdefault(type(module).__name__, 0)
        if getattr(module.__dict__.get("forward"), "__func__", None) is not _rope_scoped_forward:
            module.forward = _Method(_rope_scoped_forward, module)
            counts[type(module).__name__] += 1
    if not counts:
        report.not_patched.append(f"rope: no attention module of this {family} model calls its modeling "
                                  "module's apply_rotary_pos_emb; left as is")
    for cls, n in sorted(counts.items()):
        report.patched.append(f"rope: {n} {cls} module(s) run kernels.rope" if n
                              else f"rope: {cls} already runs kernels.rope")


# ----------------------------------------------------------------------------- transformers models


def _hf_causal_lm_family(model: torch.nn.Module) -> str | None:
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or not hasattr(model, "base_model") or model.base_model is model:
        return None
    return family


def _warn_once(reason: str, fallback: str) -> None:
    if torch.compiler.is_compiling():
        return  # torch.compile cannot trace warnings.warn: it would break the graph
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"kernels.patch attention: {reason} is not supported by the fused kernel; "
                      f"running transformers' {fallback} attention", stacklevel=4)


def _window_left(sliding_window) -> int:
    """flash-attention's left window for transformers' ``sliding_window`` w, -1 for none.

    transformers' mask lets query i see key j when ``i - w < j <= i``: the last w keys,
    itself included, so ``window_size=(w - 1, 0)``.
    """
    return -1 if sliding_window is None else int(sliding_window) - 1


def _visible(q_len: int, kv_len: int, left: int, device: torch.device) -> torch.Tensor:
    """(Nq, Nk) bottom-right causal mask, within ``left`` keys of the diagonal where ``left >= 0``."""
    return visibility(q_len, kv_len, kv_len - q_len, left, 0, device)[0]


def _is_4d_bool(mask: torch.Tensor, q_len: int, kv_len: int) -> bool:
    return mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[-2:] == (q_len, kv_len)


def _kv_lens_from_mask(mask: torch.Tensor, q_len: int, kv_len: int, left: int = -1) -> torch.Tensor | None:
    """``kv_lens`` (B,) when the boolean (B, 1, Nq, Nk) ``mask`` is bottom-right causal (within a window
    of ``left`` keys) plus right padding."""
    if not _is_4d_bool(mask, q_len, kv_len):
        return None
    j = torch.arange(kv_len, device=mask.device)
    if left < 0:
        kv_lens = mask[:, 0, -1, :].sum(-1)  # the last query sees every unpadded key
    else:  # a window hides the first keys from the last query; each later key is seen on its own diagonal
        kv_lens = (kv_len - q_len) + mask[:, 0, :, kv_len - q_len:].any(1).sum(-1)
    expected = _visible(q_len, kv_len, left, mask.device)[None] & (j[None, None, :] < kv_lens[:, None, None])
    if not torch.equal(mask[:, 0], expected):
        return None
    return kv_lens


def _cu_seqlens_from_mask(mask: torch.Tensor, n: int, left: int) -> torch.Tensor | None:
    """int32 prefix sums over the flattened (B * N) tokens when the boolean (B, 1, N, N) ``mask`` is
    transformers' packed-sequence mask: causal (within ``left``) inside each sequence, nothing across.

    A sequence starts at 0 and wherever a query cannot see the key just before it.
    """
    if not _is_4d_bool(mask, n, n) or n < 2:
        return None
    rows = torch.arange(1, n, device=mask.device)
    starts = torch.ones(mask.shape[0], n, dtype=torch.bool, device=mask.device)
    starts[:, 1:] = ~mask[:, 0, rows, rows - 1]
    sequence = starts.cumsum(-1)  # (B, N): which sequence of its row each token is in
    expected = _visible(n, n, left, mask.device)[None] & (sequence[:, :, None] == sequence[:, None, :])
    if not torch.equal(mask[:, 0], expected):
        return None
    begins = starts.flatten().nonzero().flatten()
    return torch.cat([begins, begins.new_tensor([starts.numel()])]).to(torch.int32)


def _length_bound(maximum: int | torch.Tensor | None) -> int | None:
    """A ``max_length_q/k`` keyword argument as :func:`kernels.varlen_attention` takes it.

    The flattening collator gives a Python int, used as is; transformers' own
    ``prepare_fa_kwargs_from_position_ids`` a 0-d tensor, read on the host eagerly, but not
    while ``torch.compile`` traces (reading it would break the graph, or put a ``.item()``, a
    host sync, into it): there None, and the launch grid covers the total length (correct;
    the programs past a sequence's end exit at once).
    """
    if not isinstance(maximum, torch.Tensor):
        return maximum
    return None if torch.compiler.is_compiling() else int(maximum)


def _varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_q, max_k, *, scale, left, softcap):
    """(B, H, N, D) tensors packed as (B * N, H, D) through :func:`kernels.varlen_attention`; (B, N, H, D) out."""
    b, n = query.shape[0], query.shape[2]
    max_q, max_k = _length_bound(max_q), _length_bound(max_k)
    q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (query, key, value))
    out = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal=True, scale=scale,
                           window_size=(left, 0), softcap=softcap)
    return out.view(b, n, *out.shape[1:])


def fastlm_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             is_causal=None, **kwargs):
    """transformers' attention-function signature over :func:`kernels.attention` / :func:`kernels.varlen_attention`.

    ``query`` (B, H, Nq, D), ``key``/``value`` (B, Hkv, Nk, D); returns ((B, Nq, H, D), None).
    The module's ``sliding_window`` and ``softcap`` keyword arguments become ``window_size``
    and ``softcap``; packed sequences (the ``cu_seq_lens_q/k`` keyword arguments of
    transformers' flattening collator, or the mask transformers builds from position_ids
    that restart) run varlen attention.
    """
    softcap = kwargs.get("softcap") or 0.0

    def fallback(reason: str):
        # transformers' SDPA has no softcap: a model that has one (Gemma 2) falls back to its own eager attention.
        mask = attention_mask
        if softcap:
            forward, name = sys.modules[type(module).__module__].eager_attention_forward, "eager"
            if mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
                # SDPA's None means "plain causal" (within the window), which eager attention cannot infer.
                mask = _visible(query.shape[2], key.shape[2], _window_left(kwargs.get("sliding_window")),
                                query.device)[None, None]
            if mask is not None and mask.dtype == torch.bool:
                # Eager attention adds its mask to the scores; ours (SDPA's) is boolean: make it additive.
                mask = torch.zeros_like(mask, dtype=query.dtype).masked_fill_(~mask, torch.finfo(query.dtype).min)
        else:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward as forward
            name = "sdpa"
        _warn_once(reason, name)
        return forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                       is_causal=is_causal, **kwargs)

    if dropout > 0.0:
        return fallback("attention dropout in training")
    for option in ("position_bias", "s_aux", "sinks"):
        if kwargs.get(option) is not None:
            return fallback(option)
    if query.shape[-1] > MAX_HEAD_DIM or value.shape[-1] != query.shape[-1]:
        return fallback("this head dim")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    left = _window_left(kwargs.get("sliding_window"))
    if left >= 0 and not causal:
        return fallback("a bidirectional sliding window")
    q_len, kv_len = query.shape[2], key.shape[2]
    cu_seqlens_q, cu_seqlens_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if causal and cu_seqlens_q is not None and cu_seqlens_k is not None:
        # The flattening collator's boundaries, as transformers' flash-attention path takes them.
        out = _varlen(query, key, value, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32),
                      kwargs.get("max_length_q"), kwargs.get("max_length_k"), scale=scaling, left=left,
                      softcap=softcap)
        return out, None
    kv_lens = None
    if attention_mask is not None:
        if not causal:
            return fallback("an attention mask on a non-causal layer")
        if torch.compiler.is_compiling():
            # Telling right padding or packing from the mask reads its values, a graph break; and while
            # compiling, transformers builds a mask even for a plain batch without a cache.
            return fallback("an attention mask under torch.compile")
        kv_lens = _kv_lens_from_mask(attention_mask, q_len, kv_len, left)
        if kv_lens is None:
            cu_seqlens = _cu_seqlens_from_mask(attention_mask, q_len, left) if q_len == kv_len else None
            if cu_seqlens is None:
                return fallback("an attention mask other than causal with right padding or packed sequences")
            # No document crosses a row: q_len bounds every length, so sizing the grid needs no sync.
            return _varlen(query, key, value, cu_seqlens, cu_seqlens, q_len, q_len, scale=scaling, left=left,
                           softcap=softcap), None
    elif causal and 1 < q_len < kv_len:
        # transformers' SDPA path does the same: a prefill into an empty static cache.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = attention(query, key, value, causal=causal, scale=scaling, kv_lens=kv_lens,
                    window_size=(left, 0 if causal else -1), softcap=softcap)  # (B, H, Nq, D)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, fastlm_attention_forward)
    # SDPA's masks: None when plain causal suffices, else a boolean (B, 1, Nq, Nk) mask.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _patch_attention(model, family: str, report: PatchReport) -> None:
    _register_attention()
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        try:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
        except (ValueError, KeyError, ImportError) as e:
            report.not_patched.append(f"attention: {family} model refused the '{ATTN_IMPLEMENTATION}' "
                                      f"implementation: {e}")
            return
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        report.not_patched.append(f"attention: {type(model).__name__} cannot switch attention implementation")
        return
    report.patched.append(f"attention: {family} attention runs kernels.attention "
                          f"(attn_implementation='{ATTN_IMPLEMENTATION}')")


# ----------------------------------------------------------------------------- loss


def _causal_lm_loss(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, *,
                    num_items_in_batch=None, ignore_index: int = -100,
                    shift_labels: torch.Tensor | None = None, softcap: float | None = None) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss(head(hidden), labels)`` through the fused head + loss
    (logits capped first, as Gemma 2's ``final_logit_softcapping``, when ``softcap`` is set)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # token t predicts t + 1
    # The caller's precision decides, as for fastlm's own models (fastlm.precision.active_dtype; kernels does
    # not import fastlm): autocast's dtype where it is on, else the hidden states'.
    dtype = autocast_dtype(hidden.device) or hidden.dtype
    bias = None if head.bias is None else head.bias.to(dtype)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]).to(dtype), head.weight.to(dtype),
                                shift_labels.reshape(-1).to(hidden.device), bias,
                                ignore_index=ignore_index, reduction=reduction, softcap=softcap)
    if num_items_in_batch is not None:
        loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch)
                       else num_items_in_batch)
    return loss


_forward_signatures: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _forward_signature(forward) -> tuple[inspect.Signature, str, type]:
    """``(signature, name of its **kwargs, output class)`` of a causal LM class's ``forward``.

    Read once per function: ``inspect.signature`` costs tens of microseconds, on every training
    step. While ``torch.compile`` traces, it is read afresh: Dynamo evaluates it at trace time
    only (with its own cache), where a lookup here would be guarded and traced.
    """
    if not torch.compiler.is_compiling() and forward in _forward_signatures:
        return _forward_signatures[forward]
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.utils import ModelOutput

    signature = inspect.signature(forward)
    var_keyword = next((n for n, p in signature.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD),
                       "kwargs")
    output_cls = signature.return_annotation
    if not (isinstance(output_cls, type) and issubclass(output_cls, ModelOutput)):
        output_cls = CausalLMOutputWithPast
    if not torch.compiler.is_compiling():
        _forward_signatures[forward] = signature, var_keyword, output_cls
    return signature, var_keyword, output_cls


def _fused_loss_forward(self, *args, **kwargs):
    """A patched causal LM's forward: with ``labels`` in training mode, the loss through
    :func:`_causal_lm_loss` and ``logits=None``; otherwise its class's own forward."""
    own_forward = type(self).forward
    signature, var_keyword, output_cls = _forward_signature(own_forward)
    bound = signature.bind(self, *args, **kwargs)
    arguments = dict(bound.arguments)
    arguments.pop("self")
    extra = arguments.pop(var_keyword, {})
    labels = arguments.pop("labels", None)
    logits_to_keep = arguments.pop("logits_to_keep", 0)
    if labels is None or not self.training or not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        return own_forward(self, *args, **kwargs)
    return_dict = extra.pop("return_dict", None)
    loss_options = {k: extra[k] for k in ("num_items_in_batch", "ignore_index", "shift_labels") if k in extra}
    outputs = self.base_model(**arguments, **extra)  # as transformers does: the same kwargs to both
    loss = _causal_lm_loss(outputs.last_hidden_state, self.get_output_embeddings(), labels,
                           softcap=getattr(self.config, "final_logit_softcapping", None) or None, **loss_options)
    fields = {k: v for k, v in outputs.items() if k != "last_hidden_state" and k in output_cls.__dataclass_fields__}
    result = output_cls(loss=loss, logits=None, **fields)
    return result.to_tuple() if return_dict is False else result


def _patch_loss(model, family: str, report: PatchReport) -> None:
    if getattr(model.__dict__.get("forward"), "__func__", None) is _fused_loss_forward:
        report.patched.append(f"loss: {family} training loss runs kernels.linear_cross_entropy (already)")
        return
    model.forward = _Method(_fused_loss_forward, model)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    report.patched.append(f"loss: {family} training loss runs kernels.linear_cross_entropy "
                          + (f"with softcap={softcap} " if softcap else "")
                          + "(logits=None when labels are passed in training mode)")
