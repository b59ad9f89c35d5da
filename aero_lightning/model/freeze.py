"""Freezing and unfreezing parameters by regex over their names, and activation checkpointing.

Patterns are Python regexes searched in the dotted parameter names of the model (``"^encoder\\."``,
``"^llm\\.model\\.layers\\.0\\."``). A pattern that matches nothing is an error, so a typo never silently trains
(or freezes) everything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

__all__ = [
    "enable_activation_checkpointing",
    "freeze",
    "frozen_components",
    "match_parameters",
    "unfreezable",
    "unfreeze",
]


def match_parameters(
    patterns: Sequence[str], named: Iterable[tuple[str, nn.Parameter]]
) -> tuple[dict[str, nn.Parameter], list[str]]:
    """The parameters whose name matches any regex in ``patterns``, and the patterns that matched none.

    Args:
        patterns: regexes (``re.search`` semantics).
        named: ``(name, parameter)`` pairs, e.g. ``module.named_parameters()``.

    Returns:
        ``({name: parameter}, unused_patterns)``.

    Raises:
        re.error: for an invalid regex.
    """
    compiled = [re.compile(p) for p in patterns]
    hits = dict.fromkeys(patterns, 0)
    found = {}
    for name, param in named:
        matched = [p.pattern for p in compiled if p.search(name)]
        for pattern in matched:
            hits[pattern] += 1
        if matched:
            found[name] = param
    return found, [p for p, n in hits.items() if n == 0]


def freeze(module: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Set ``requires_grad=False`` on the parameters of ``module`` whose name matches any regex in ``patterns``.

    Returns:
        The names frozen, sorted.

    Raises:
        ValueError: if a pattern matches no parameter.
    """
    found, unused = match_parameters(patterns, module.named_parameters())
    if unused:
        raise ValueError(
            f"freeze patterns {unused} match no parameter; names look like 'encoder.encoder.conv1.weight'"
        )
    for param in found.values():
        param.requires_grad_(False)
    return sorted(found)


def unfreezable(
    module: nn.Module, patterns: Sequence[str], fixed: Iterable[str] = ()
) -> dict[str, nn.Parameter]:
    """The frozen parameters matching ``patterns`` that a later stage may train, by name.

    Args:
        module: the model.
        patterns: regexes over parameter names.
        fixed: names a component keeps frozen itself (Whisper's sinusoid position table) and the base weights of
            LoRA-wrapped layers (``AeroModel.fixed_parameters``); never included.

    Raises:
        ValueError: if a pattern matches no such parameter.
    """
    fixed = set(fixed)
    frozen = ((n, p) for n, p in module.named_parameters() if not p.requires_grad and n not in fixed)
    found, unused = match_parameters(patterns, frozen)
    if unused:
        raise ValueError(
            f"unfreeze patterns {unused} match no frozen parameter (frozen by model.freeze; the base weights of "
            "LoRA-wrapped layers never unfreeze)"
        )
    return found


def unfreeze(module: nn.Module, patterns: Sequence[str], fixed: Iterable[str] = ()) -> list[str]:
    """Set ``requires_grad=True`` on the frozen parameters matching ``patterns`` (:func:`unfreezable`).

    The inverse of :func:`freeze`, for a schedule that trains a part only after some steps.

    Returns:
        The names made trainable, sorted.

    Raises:
        ValueError: if a pattern matches no frozen parameter.
    """
    found = unfreezable(module, patterns, fixed)
    for param in found.values():
        param.requires_grad_(True)
    return sorted(found)


def frozen_components(module: nn.Module, names: Sequence[str]) -> list[str]:
    """The children of ``module`` among ``names`` whose every parameter is frozen (they stay in eval mode)."""
    return [n for n in names if all(not p.requires_grad for p in getattr(module, n).parameters())]


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing in the layers of an HF model.

    The reentrant variant gives no gradients when the checkpointed layer's inputs do not require grad (frozen first
    layers; transformers issues 21381 and 23170).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
