"""LoRA adapters on the encoder's and the LLM's linear layers, through peft.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685) keeps a pre-trained
weight ``W`` (out x in) fixed and trains ``ΔW = (alpha / r) · B A`` with ``A`` (r x in) random and ``B`` (out x r)
zero at the start, so training begins from the pre-trained function. peft's ``inject_adapter_in_model`` wraps each
targeted ``nn.Linear`` in place: the module keeps its name, its weight moves to ``<name>.base_layer.weight``, and
the adapter is ``<name>.lora_A.default.weight`` / ``<name>.lora_B.default.weight``. Every other module and
parameter name of the model stays as it was, so ``AeroModel.forward`` and ``generate``, FSDP2's per-block sharding
and the checkpoint layout work unchanged; a Lightning checkpoint holds the adapters under those names.

Rules (:func:`apply_lora`, called by :class:`~aero_lightning.model.aero.AeroModel` after ``model.freeze``):

- the adapters always train; the base weights of the wrapped layers are always frozen, and ``module.unfreeze``
  never unfreezes them (they join ``AeroModel.fixed_parameters``);
- every other parameter keeps what ``model.freeze`` decided, so the projector of a ``freeze: ['^encoder\\.',
  '^llm\\.']`` run still trains and the adapters train beside it;
- ``model.freeze`` patterns are matched against the names the model has without adapters (``...q_proj.weight``);
  ``module.unfreeze`` and ``module.lr_groups`` patterns against the names with them (``^llm\\.`` matches the LLM's
  adapters, ``lora_`` every adapter).

:func:`merged_state_dict` gives the weights with every adapter folded into its base weight
(``W + (alpha / r) · B A``, peft's ``get_delta_weight``) under the plain names, which is what the transformers
export and :func:`~aero_lightning.model.build.save_pretrained` write: the exported model has no adapters and needs
no peft.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from aero_lightning.errors import UserValueError

__all__ = [
    "LORA_KEYS",
    "apply_lora",
    "base_weight_names",
    "is_adapter_name",
    "lora_layers",
    "lora_options",
    "map_lora_names",
    "merged_state_dict",
]

LORA_KEYS = ("target_modules", "r", "alpha", "dropout")
"""Keys of ``model.lora`` (``conf/model/lora/*.yaml``)."""

ADAPTER_NAME = "default"
"""peft's adapter name; it appears in the parameter names (``lora_A.default.weight``)."""

BASE = "base_layer."
"""What peft inserts into the names of a wrapped layer's own parameters."""


def lora_options(spec: Mapping | None) -> dict | None:
    """Validate ``model.lora``.

    Args:
        spec: ``{"target_modules": regex or [regex, ...], "r": rank, "alpha": scale numerator, "dropout": p}``;
            None, or a null or empty ``target_modules``, means no adapters (``conf/model/lora/none.yaml``).

    Returns:
        ``{"target_modules": [regex, ...], "r": int, "alpha": float, "dropout": float}``, or None for no adapters.

    Raises:
        UserValueError: for an unknown key, ``r < 1``, ``alpha <= 0``, ``dropout`` outside ``[0, 1)`` or an invalid
            regex.
    """
    if not spec or not spec.get("target_modules"):
        return None
    unknown = set(spec) - set(LORA_KEYS)
    if unknown:
        raise UserValueError(f"model.lora: unknown keys {sorted(unknown)}; allowed: {list(LORA_KEYS)}")
    targets = spec["target_modules"]
    targets = [targets] if isinstance(targets, str) else [str(t) for t in targets]
    for pattern in targets:
        try:
            re.compile(pattern)
        except re.error as err:
            raise UserValueError(
                f"model.lora.target_modules: {pattern!r} is not a valid regex ({err})"
            ) from err
    out = {
        "target_modules": targets,
        "r": int(spec.get("r", 16)),
        "alpha": float(spec.get("alpha", 32)),
        "dropout": float(spec.get("dropout", 0.0)),
    }
    if out["r"] < 1 or out["alpha"] <= 0 or not 0.0 <= out["dropout"] < 1.0:
        raise UserValueError(
            f"model.lora needs r >= 1, alpha > 0 and 0 <= dropout < 1, got r={out['r']}, alpha={out['alpha']}, "
            f"dropout={out['dropout']}"
        )
    return out


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The LoRA-wrapped layers of ``model`` (peft ``LoraLayer`` modules), by module name, in ``named_modules`` order."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def base_weight_names(model: nn.Module) -> set[str]:
    """Names of the wrapped layers' own parameters (``<layer>.base_layer.weight``, ``...bias``)."""
    return {
        f"{name}.{BASE}{n}"
        for name, layer in lora_layers(model).items()
        for n, _ in layer.base_layer.named_parameters()
    }


def apply_lora(model: nn.Module, options: Mapping) -> list[str]:
    """Wrap the linear layers named by ``options["target_modules"]`` with LoRA adapters, in place (peft).

    ``requires_grad`` afterwards: adapters True; the wrapped layers' base weights False; every other parameter as
    before (peft's own injection freezes everything but the adapters; that is undone here).

    Args:
        model: the module to adapt (an :class:`~aero_lightning.model.aero.AeroModel`); module names are relative
            to it (``llm.model.layers.0.self_attn.q_proj``).
        options: :func:`lora_options`' result. Each regex must match whole module names (peft's ``re.fullmatch``);
            the adapter's dtype and device are its base layer's.

    Returns:
        The names of the wrapped layers, in ``named_modules`` order.

    Raises:
        UserValueError: if a regex matches no module, or matches a module peft cannot wrap (LoRA here is for
            ``nn.Linear`` layers).
    """
    from peft import LoraConfig, inject_adapter_in_model

    names = [name for name, _ in model.named_modules() if name]
    for pattern in options["target_modules"]:
        hits = [n for n in names if re.fullmatch(pattern, n)]
        if not hits:
            raise UserValueError(
                f"model.lora.target_modules: {pattern!r} matches no module (it must match whole names such as "
                f"'llm.model.layers.0.self_attn.q_proj')"
            )
        wrong = [n for n in hits if not isinstance(model.get_submodule(n), nn.Linear)]
        if wrong:
            raise UserValueError(
                f"model.lora.target_modules: {pattern!r} matches modules that are not nn.Linear: {wrong[:4]}"
            )
    config = LoraConfig(
        r=options["r"],
        lora_alpha=options["alpha"],
        lora_dropout=options["dropout"],
        # one regex: peft fullmatches a string against each module name (a list would mean name suffixes)
        target_modules="|".join(f"(?:{p})" for p in options["target_modules"]),
        bias="none",
    )
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    layers = lora_layers(model)
    base = {id(p) for layer in layers.values() for p in layer.base_layer.parameters()}
    for p in model.parameters():
        if id(p) in base:
            p.requires_grad_(False)
        elif id(p) in trainable:
            p.requires_grad_(trainable[id(p)])
        else:  # a new adapter weight
            p.requires_grad_(True)
    return list(layers)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every LoRA adapter merged into its base weight, under the plain names.

    For each wrapped layer, ``<layer>.base_layer.weight`` becomes ``<layer>.weight = W + ΔW`` with ``ΔW`` from
    peft's ``get_delta_weight`` (``(alpha / r) · B A``, summed over the active adapters), computed in float32 and
    cast to ``W``'s dtype; ``<layer>.base_layer.bias`` becomes ``<layer>.bias``; the adapter weights are dropped.
    The model is not changed. Without adapters this is ``model.state_dict()``.

    Args:
        model: a model with or without LoRA layers, its parameters whole (not FSDP2 shards or ZeRO-3 partitions).

    Returns:
        ``{name: tensor}`` in the model's order, detached.

    Raises:
        NotImplementedError: for a LoRA variant other than plain LoRA (DoRA and the like are never configured here).
    """
    state = model.state_dict()
    layers = lora_layers(model)
    if not layers:
        return state
    out: dict[str, torch.Tensor] = {}
    owner = {f"{name}.": layer for name, layer in layers.items()}
    for key, value in state.items():
        prefix = next((p for p in owner if key.startswith(p)), None)
        if prefix is None:
            out[key] = value
            continue
        rest = key[len(prefix) :]
        if not rest.startswith(BASE):
            continue  # lora_A / lora_B: folded into the base weight below
        layer = owner[prefix]
        if getattr(layer, "lora_variant", None):
            raise NotImplementedError(
                f"{prefix[:-1]}: merging a LoRA variant ({layer.lora_variant}) is not supported"
            )
        if rest == BASE + "weight" and not layer.merged:
            delta = sum(layer.get_delta_weight(a).float() for a in layer.active_adapters if a in layer.lora_A)
            value = (value.float() + delta).to(value.dtype)
        out[prefix + rest[len(BASE) :]] = value.detach()
    return out


def map_lora_names(source: Sequence[str], own: Sequence[str]) -> dict[str, str]:
    """Pair checkpoint weight names with a model's, across the LoRA renaming.

    A name found in ``own`` maps to itself. Otherwise a plain ``<layer>.weight`` maps to ``<layer>.base_layer.weight``
    when the model has that layer wrapped (a run without LoRA loaded into a model with it), and
    ``<layer>.base_layer.weight`` maps to ``<layer>.weight`` when the model does not (the frozen base weights of a
    LoRA run; its adapters have no counterpart and stay unmapped).

    Args:
        source: the checkpoint's names.
        own: the model's names (``model.state_dict()`` keys).

    Returns:
        ``{source name: own name}`` for every name that has a counterpart.
    """
    own_set = set(own)
    mapping = {}
    for name in source:
        if name in own_set:
            mapping[name] = name
            continue
        if f".{BASE}" in name:
            plain = name.replace(f".{BASE}", ".")
            if plain in own_set:
                mapping[name] = plain
            continue
        head, dot, leaf = name.rpartition(".")
        if dot and f"{head}.{BASE}{leaf}" in own_set:
            mapping[name] = f"{head}.{BASE}{leaf}"
    return mapping


def is_adapter_name(name: str) -> bool:
    """Whether a parameter name is a LoRA adapter weight (``...lora_A.<adapter>.weight``)."""
    return (
        ".lora_A." in name
        or ".lora_B." in name
        or ".lora_embedding_" in name
        or ".lora_magnitude_vector" in name
    )
