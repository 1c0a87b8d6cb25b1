"""Which decoder layers carry LoRA adapters (``lora.layers``), and the shared trunk below them.

``lora.layers`` is ``all`` (every layer, the default), ``top:N`` (the top N decoder layers), ``top:P/Q`` (the top
fraction P/Q of them, at least one) or a list of layer indices (0 = the layer nearest the embeddings). It is passed
to peft as ``layers_to_transform`` with ``layers_pattern`` = the path of the model's decoder layer list
(``model.layers`` for Llama-style models, ``decoder.block`` for T5), so a saved adapter loads with plain
``PeftModel.from_pretrained``. For an encoder-decoder model the indices are decoder blocks and the encoder gets no
adapter (with ``all`` both stacks are adapted, as before).

The *trunk* of a set of adapters is the decoder layers below the lowest layer any of them adapts: there every
stream of the ensemble computes the same thing, so the ensemble runs it once, and training stops its backward pass
there.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from emorl.utils import EmorlError

FIELD = "lora.layers"
HELP = "give 'all', 'top:N' (e.g. top:10), 'top:P/Q' (e.g. top:1/3) or a list of layer indices (e.g. [20, 21])"


def check_layer_spec(spec: Any) -> None:
    """Refuse a malformed ``lora.layers`` before any work (no model needed; the depth is checked by
    :func:`resolve_layers`)."""
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "all":
            return
        m = re.fullmatch(r"top:(\d+)(?:/(\d+))?", s)
        if m and int(m.group(1)) >= 1 and (m.group(2) is None or int(m.group(1)) <= int(m.group(2))):
            return
        raise EmorlError(f"{FIELD}={spec!r} is not a layer spec: {HELP}")
    if isinstance(spec, list | tuple) and spec and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        if min(spec) < 0 or len(set(spec)) != len(spec):
            raise EmorlError(f"{FIELD}={list(spec)}: layer indices must be distinct and >= 0 (0 = the layer next "
                             "to the embeddings)")
        return
    raise EmorlError(f"{FIELD}={spec!r} is not a layer spec: {HELP}")


def layer_stack(lm: Any) -> tuple[str, Any]:
    """(path, ModuleList) of the decoder's layers in the transformers model ``lm`` (not a PeftModel), e.g.
    ("model.layers", ...) for Llama, ("decoder.block", ...) for T5: the longest ModuleList of the decoder stack."""
    import torch

    decoder = lm.get_decoder()
    lists = [m for m in decoder.children() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise EmorlError(f"{type(lm).__name__}: cannot find the decoder's list of layers, so {FIELD} cannot be "
                         "applied; use lora.layers: all")
    stack = max(lists, key=len)
    path = next(name for name, mod in lm.named_modules() if mod is stack)
    return path, stack


def resolve_layers(spec: Any, lm: Any) -> list[int] | None:
    """The decoder layer indices ``spec`` names in model ``lm`` (sorted), or None for ``all``; a layer outside the
    model's depth is an error naming ``lora.layers``."""
    check_layer_spec(spec)
    if isinstance(spec, str) and spec.strip().lower() == "all":
        return None
    depth = len(layer_stack(lm)[1])
    if isinstance(spec, str):
        m = re.fullmatch(r"top:(\d+)(?:/(\d+))?", spec.strip().lower())
        assert m is not None
        n = int(m.group(1)) if m.group(2) is None else max(1, round(depth * Fraction(int(m.group(1)),
                                                                                     int(m.group(2)))))
        if n > depth:
            raise EmorlError(f"{FIELD}={spec!r}: the model has {depth} decoder layers; give top:N with N <= {depth}")
        return list(range(depth - n, depth))
    bad = [i for i in spec if i >= depth]
    if bad:
        raise EmorlError(f"{FIELD}={list(spec)}: layers {bad} are outside the model's {depth} decoder layers "
                         f"(0..{depth - 1})")
    return sorted(spec)


def peft_layer_kwargs(spec: Any, target_modules: list[str] | str, lm: Any) -> dict[str, Any]:
    """The arguments of peft's ``LoraConfig`` that put the adapter on the layers ``spec`` names: the same
    ``target_modules`` (``all-linear`` spelled out as the decoder layers' linear leaf names: peft refuses
    ``layers_to_transform`` with a string), ``layers_to_transform`` and ``layers_pattern``."""
    import torch

    layers = resolve_layers(spec, lm)
    if layers is None:
        return {"target_modules": target_modules}
    path, stack = layer_stack(lm)
    if isinstance(target_modules, str):
        if target_modules.lower() != "all-linear":
            raise EmorlError(f"{FIELD}: lora.target_modules={target_modules!r} is a regular expression, which peft "
                             "cannot combine with chosen layers; give target_modules as a list of names or "
                             "'all-linear'")
        from peft.tuners.lora import LoraLayer

        # a linear layer that adapters already wrap counts as the linear it wraps (its insides do not)
        inside = {id(sub) for mod in stack.modules() if isinstance(mod, LoraLayer) for sub in mod.modules()
                  if sub is not mod}
        target_modules = sorted({name.rsplit(".", 1)[-1] for name, mod in stack.named_modules()
                                 if id(mod) not in inside and (isinstance(mod, torch.nn.Linear | LoraLayer))})
    return {"target_modules": list(target_modules), "layers_to_transform": layers, "layers_pattern": path}


def adapted_layers(lm: Any, name: str) -> list[int] | None:
    """The decoder layer indices where adapter ``name`` has LoRA weights (sorted), or None if it also adapts a
    module outside the decoder's layers (the encoder of a seq2seq model, an embedding): then it has no trunk."""
    path = layer_stack(lm)[0]
    pat = re.compile(rf"^{re.escape(path)}\.(\d+)\.")
    found: set[int] = set()
    for mod_name, mod in _lora_modules(lm):
        if name not in mod.lora_A:
            continue
        m = pat.match(mod_name)
        if m is None:
            return None
        found.add(int(m.group(1)))
    return sorted(found)


def trunk_depth(lm: Any, names: list[str]) -> int:
    """How many decoder layers at the bottom carry none of the adapters ``names`` (ignoring names that are no
    loaded adapter, such as the LoRA bank's base slot); 0 when any of them adapts something outside the decoder
    layers."""
    depth = len(layer_stack(lm)[1])
    loaded = {n for _, mod in _lora_modules(lm) for n in mod.lora_A}
    lowest = depth
    for n in names:
        if n not in loaded:
            continue
        layers = adapted_layers(lm, n)
        if layers is None:
            return 0
        if layers:
            lowest = min(lowest, layers[0])
    return lowest


def _lora_modules(lm: Any) -> list[tuple[str, Any]]:
    """peft's LoRA layers of ``lm`` (name, module), names relative to ``lm``."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in lm.named_modules() if isinstance(m, LoraLayer) and len(m.lora_A)]


def recorded_layers(model: Any, name: str) -> list[int] | str | None:
    """What ``emorl.json`` records of adapter ``name`` on ``model`` (a PeftModel): its decoder layer indices, "all"
    (peft's default: every matching module), or None when ``name`` is no LoRA adapter of it (a full fine-tune)."""
    pc = getattr(model, "peft_config", {}).get(name)
    if pc is None:
        return None
    layers = getattr(pc, "layers_to_transform", None)
    return "all" if layers is None else sorted([layers] if isinstance(layers, int) else layers)
