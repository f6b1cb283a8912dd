"""Extras: what the classifier adds to its backbone (SLCA, fusion, a cache-only head), one door.

An extra is an ``nn.Module`` that reads the batch's cached embedding and acts on the model in
one or more of three ways, each a method of :class:`Extra` with a do-nothing default:

- :meth:`~Extra.inside`: a context held around the backbone's forward pass (SLCA hands its
  gates the embedding there; the gates themselves sit in the backbone through forward hooks);
- :meth:`~Extra.logits`: logits added to the backbone's (fusion's linear head on embedding
  statistics);
- ``replaces_backbone``: its :meth:`~Extra.logits` are the model's, and the backbone is not run
  (the cache-only head of ``--backbone none``).

Besides, it says which embedding grid it reads (:meth:`~Extra.grid`), its optimizer groups
(:meth:`~Extra.param_groups`) and its part of the model line (:meth:`~Extra.describe`).

A new extra is one module that defines the class and registers its builder::

    @register_extra("myextra")               # order=100
    def build(cfg, backbone, num_classes, img_size):
        return MyExtra(...) if <cfg asks for it> else None

Builders run in ascending ``order`` (SLCA 10, fusion 20, head 30: the order in which the
classifier's random initialization has always been drawn, whatever imports first; a new extra
takes 100 by default, so it draws after them and leaves their initial weights as they were), and
each extra is a child module of the classifier
under its registered name, so a checkpoint's keys are ``<name>.<parameter>`` (``slca.*``,
``fuse.*``, ``head.*``, as before extras had a door).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

__all__ = ["Extra", "EXTRAS", "register_extra", "build_extras"]


class Extra(nn.Module):
    """The protocol of an extra; subclasses override what they use.

    Attributes:
      reads_embeddings: whether :meth:`inside` or :meth:`logits` needs the batch's embeddings.
      replaces_backbone: its :meth:`logits` are the whole model's (the backbone is not run).
    """

    reads_embeddings: bool = True
    replaces_backbone: bool = False

    def grid(self) -> tuple[int, bool] | None:
        """``(side, fixed)``: the embedding grid it reads, and whether it needs exactly that side
        (SLCA's pooled grid) or merely prefers it (fusion's statistics work at any side). None:
        it reads no embedding."""
        return None

    def inside(self, embeddings: torch.Tensor) -> contextlib.AbstractContextManager:
        """A context held around the backbone's forward pass."""
        return contextlib.nullcontext()

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor | None:
        """Logits added to the backbone's (or, with ``replaces_backbone``, the model's); None: none."""
        return None

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Its AdamW groups: timm's weight-decay split at ``lr`` by default. A group that carries a
        ``name`` has its own learning rate and is placed after the shared groups."""
        from timm.optim import param_groups_weight_decay

        groups = param_groups_weight_decay(self, weight_decay)
        for g in groups:
            g["lr"] = lr
        return groups

    def describe(self) -> str:
        """Its part of the model line, without its parameter count (the caller adds it)."""
        return type(self).__name__


Builder = Callable[..., "Extra | None"]
#: ``{name: builder(cfg, backbone, num_classes, img_size) -> Extra | None}``
EXTRAS: dict[str, Builder] = {}
_ORDER: dict[str, int] = {}


def register_extra(name: str, order: int = 100) -> Callable[[Builder], Builder]:
    """Register ``builder(cfg, backbone, num_classes, img_size)``: it returns the extra the run's
    :class:`~trainer.config.TrainConfig` asks for, or None. ``name`` is the classifier's attribute
    and the prefix of the extra's keys in a checkpoint; ``order`` places its build (and its
    draws from the random generator) among the others'.

    Raises:
      ValueError: ``name`` is taken, or is a name the classifier itself uses.
    """
    if name in EXTRAS or name in ("backbone", "extras"):
        raise ValueError(f"an extra named {name!r} is registered already (or the name is reserved)")

    def add(builder: Builder) -> Builder:
        EXTRAS[name], _ORDER[name] = builder, order
        return builder
    return add


def build_extras(cfg, backbone: nn.Module, num_classes: int, img_size: int) -> dict[str, Extra]:
    """Every registered extra that ``cfg`` asks for, ``{name: extra}``, built in their order."""
    built = {}
    for name in sorted(EXTRAS, key=lambda n: _ORDER[n]):  # stable: equal orders in registration order
        extra = EXTRAS[name](cfg, backbone, num_classes, img_size)
        if extra is not None:
            built[name] = extra
    return built
