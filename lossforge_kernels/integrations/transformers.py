"""Hugging Face transformers causal LMs trained on linear_cross_entropy, without the (N, V) logits.

    from lossforge_kernels.integrations import transformers as lf_hf
    model = lf_hf.patch(AutoModelForCausalLM.from_pretrained(...), z_loss=1e-4)

`patch` replaces the forward of one model instance (a PEFT wrapper's inner model when wrapped):
called with `labels` while autograd records (or in training mode), the patched forward runs the base
model, slices its last hidden states by `logits_to_keep` as the model's own forward does and takes the
loss from linear_cross_entropy on them and the `lm_head` weight (and bias), with transformers' causal
loss conventions: labels shifted left (or `shift_labels` as given), -100 ignored, 'mean', or the sum
divided by `num_items_in_batch` when given, Gemma's `final_logit_softcapping` as `softcap`. The output
keeps its type with `logits=None`. Without labels, in eval mode without grad, or with
`return_logits=True`, the model's own forward runs.

Only forwards of the Llama shape are patched (base model, slice, `lm_head`, optional softcap, the
causal loss): any other step on the logits (a logit scale, an auxiliary loss...) is refused by name.
"""
from __future__ import annotations

import functools
import inspect
import re
import types
import typing

import torch
import transformers
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..losses.linear_cross_entropy import linear_cross_entropy

try:
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # before the helper existed, forwards sliced inline the same way
    def slice_logits_to_keep(hidden_states, logits_to_keep):
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, keep, :]

IGNORE_INDEX = -100  # transformers' causal loss default
# linear_cross_entropy arguments the patch supplies (ignore_index and reduction: transformers' convention).
_SUPPLIED = {"input", "linear_weight", "target", "linear_bias", "ignore_index", "reduction", "backend"}
_OPTIONS = set(inspect.signature(linear_cross_entropy).parameters) - _SUPPLIED
# The statements a patchable forward may hold between its lm_head call and its loss call.
_ALLOWED_BETWEEN = re.compile(r"loss = None|if labels is not None:"
                              r"|if self\.config\.final_logit_softcapping is not None:"
                              r"|logits = logits / self\.config\.final_logit_softcapping"
                              r"|logits = torch\.tanh\(logits\)"
                              r"|logits = logits \* self\.config\.final_logit_softcapping")
_STATE = "_lossforge_patch"  # instance attribute: the patch's state, present while patched
_NO_FORWARD = object()  # the instance had no forward of its own before the patch


def patch(model, *, backend="auto", **options):
    """Make `model`'s training loss linear_cross_entropy(hidden, lm_head.weight, shifted labels, ...).

    options: linear_cross_entropy's keyword options (label_smoothing, z_loss, chunk_size, ...).
    Returns `model`; patching a patched model replaces its options."""
    lm = _causal_lm(model)
    unknown = set(options) - _OPTIONS
    if unknown:
        raise TypeError(f"patch() got options linear_cross_entropy does not take: {sorted(unknown)}; "
                        f"it takes {sorted(_OPTIONS)}")
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap is not None and "softcap" in options:
        raise TypeError(f"patch() got softcap, but {type(lm).__name__} caps its logits at "
                        f"config.final_logit_softcapping={cap}, which the patch applies")
    if hasattr(lm, _STATE):
        unpatch(lm)
    original = lm.__dict__.get("forward", _NO_FORWARD)
    setattr(lm, _STATE, (original, dict(options, backend=backend, softcap=cap) if cap is not None
                         else dict(options, backend=backend)))
    lm.forward = types.MethodType(_with_signature_of(type(lm).forward), lm)
    return model


def _with_signature_of(forward):
    """_forward under the class forward's name and signature: callers that inspect it (transformers'
    Trainer keeps only the dataset columns the forward names) see the model's own arguments."""
    @functools.wraps(forward)
    def patched(self, *args, **kwargs):
        return _forward(self, *args, **kwargs)

    return patched


def unpatch(model):
    """Give `model` back the forward it had before `patch`. Returns `model`."""
    lm = _causal_lm(model)
    if not hasattr(lm, _STATE):
        raise ValueError(f"{type(lm).__name__} is not patched")
    original, _ = lm.__dict__.pop(_STATE)
    del lm.forward
    if original is not _NO_FORWARD:
        lm.forward = original
    return model


def _causal_lm(model):
    """The transformers model inside `model` (a PEFT wrapper's base model), checked patchable."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") and not isinstance(
        model, transformers.PreTrainedModel) else model
    name = type(inner).__name__
    if not isinstance(inner, transformers.PreTrainedModel):
        raise TypeError(f"patch() needs a transformers PreTrainedModel, got {name}")
    if not isinstance(getattr(inner, "lm_head", None), nn.Linear):
        raise TypeError(f"{name} has no lm_head nn.Linear: its loss cannot come from linear_cross_entropy")
    if not isinstance(getattr(inner, "model", None), nn.Module):
        raise TypeError(f"{name} has no base model at .model: its forward does not fit the patch")
    _check_forward_shape(type(inner))
    if inner.loss_function is not ForCausalLMLoss:
        raise TypeError(f"{name}'s loss_function is not transformers' causal LM loss: the patch would replace it")
    return inner


def _check_forward_shape(cls):
    """Refuse a forward that does more to the logits, or to the loss, than the patch reproduces."""
    forward = inspect.unwrap(cls.forward)
    source = inspect.getsource(forward)
    returns = inspect.signature(forward).return_annotation
    returns_plain = returns is CausalLMOutputWithPast or CausalLMOutputWithPast in typing.get_args(returns) or (
        isinstance(returns, str) and re.search(r"\bCausalLMOutputWithPast\b", returns))
    head, loss = source.find("self.lm_head(hidden_states"), source.find("self.loss_function(")
    between = source[source.find("\n", head) + 1:source.rfind("\n", 0, loss)] if 0 <= head < loss else None
    if not returns_plain or between is None or "self.model(" not in source[:head]:
        raise TypeError(f"{cls.__name__}.forward does not have the shape the patch reproduces (base model, "
                        f"lm_head, causal loss, CausalLMOutputWithPast)")
    for line in between.splitlines():
        statement = line.split("#")[0].strip()
        if statement and not _ALLOWED_BETWEEN.fullmatch(statement):
            raise TypeError(f"{cls.__name__}.forward transforms its logits in a way the patch does not reproduce: "
                            f"{statement!r}")


def _forward(self, *args, return_logits=False, **kwargs):
    original, options = getattr(self, _STATE)
    unpatched = type(self).forward.__get__(self) if original is _NO_FORWARD else original
    arguments = _named_arguments(type(self).forward.__get__(self), args, kwargs)
    wants_loss = arguments.get("labels") is not None and (torch.is_grad_enabled() or self.training)
    if return_logits or not wants_loss or self.loss_function is not ForCausalLMLoss:  # a loss set after patch()
        return unpatched(*args, **kwargs)
    return _fused_forward(self, arguments, options)


def _named_arguments(forward, args, kwargs):
    """The call's arguments by name, as the class forward receives them (its **kwargs flattened)."""
    signature = inspect.signature(forward)
    arguments = signature.bind(*args, **kwargs).arguments
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return arguments


def _fused_forward(self, arguments, options):
    """The model's forward with the loss from linear_cross_entropy and no logits."""
    labels, logits_to_keep = arguments.pop("labels"), arguments.pop("logits_to_keep", 0)
    return_dict = arguments.pop("return_dict", None)
    outputs = self.model(**arguments)
    hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
    loss = _causal_loss(hidden, self.lm_head, labels, arguments, options)
    fields = {name: getattr(outputs, name, None) for name in CausalLMOutputWithPast.__dataclass_fields__}
    result = CausalLMOutputWithPast(**dict(fields, loss=loss, logits=None))
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return result if return_dict is not False else result.to_tuple()


def _causal_loss(hidden, lm_head, labels, arguments, options):
    """transformers' ForCausalLMLoss on lm_head(hidden), computed by linear_cross_entropy."""
    ignore_index = arguments.get("ignore_index", IGNORE_INDEX)
    target = arguments.get("shift_labels")
    if target is None:  # tokens < n predict n
        target = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    num_items = arguments.get("num_items_in_batch")
    loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), lm_head.weight,
                                target.reshape(-1).to(hidden.device), linear_bias=lm_head.bias,
                                ignore_index=ignore_index, reduction="mean" if num_items is None else "sum",
                                **options).float()
    if num_items is None:
        return loss
    return loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
