"""Multi-user linear layers: one frozen nn.Linear, many users' adapter tensors, a slot per batch row.

A `MultiUserLinear` replaces a target nn.Linear of the shared base (the original module is kept
as `.base_layer` and put back by `restore_linear`). It holds one *part* per PEFT type that has a
user on this layer (`parts["lora"]`, `parts["ia3"]`, each defined in that type's own file), and
reads from the shared `RowContext` which slot of each type's bank every batch row uses. Slot 0 of
every bank is "no adapter", so a row without a user runs the plain base, bit for bit.

A part is any nn.Module with
    pre(x, rows)  -> x'        what the row's adapter does to the layer input  (IA3 feedforward)
    post(x, y, rows) -> y'     what it does to the layer output               (IA3 k/v, LoRA)
    ensure(slots), reset(slot), banks()   bank sizing and the stacked parameters [S, ...]
so a new layer-level PEFT type is one new file. Rows of different types never share a slot, and
every part is the identity on slot 0, so the parts of one layer compose in any order.

Shapes (N = batch rows, T = tokens, S = slots incl. slot 0):
  RowContext.rows[kind]   [N] long   slot of each row in `kind`'s bank (0 = none)
  x                       [N, ..., in] -> [N, ..., out]
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class RowContext:
    """Per-forward batch metadata shared by every wrapped layer: each kind's slot for each row."""

    def __init__(self) -> None:
        self.rows: dict[str, torch.Tensor] = {}  # kind -> [N] long

    def clear(self) -> None:
        self.rows = {}

    @contextmanager
    def select(self, index: torch.Tensor) -> Iterator[None]:
        """Within the block, layers see only rows `index` [M] (e.g. an lm_head over target positions)."""
        saved = self.rows
        self.rows = {k: v[index] for k, v in saved.items()}
        try:
            yield
        finally:
            self.rows = saved


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """PEFT keeps LoRA/IA3 weights in fp32 on fp16/bf16 bases (autocast_adapter_dtype); so do we."""
    return torch.promote_types(weight.dtype, torch.float32) if weight.is_floating_point() else torch.float32


def new_bank(weight: torch.Tensor, *shape: int, fill: float) -> nn.Parameter:
    """A frozen stacked tensor in the adapter dtype on the layer's device."""
    return nn.Parameter(torch.full(shape, fill, dtype=adapter_dtype(weight), device=weight.device),
                        requires_grad=False)


def row_shape(x: torch.Tensor) -> tuple[int, ...]:
    """View shape that broadcasts a per-row vector [N, D] over x's token axes."""
    return (x.shape[0],) + (1,) * (x.dim() - 2) + (-1,)


class MultiUserLinear(nn.Module):
    """A frozen nn.Linear plus per-type parts holding stacked per-user tensors; see the module docstring."""

    def __init__(self, base_layer: nn.Linear, ctx: RowContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "ctx", ctx)  # shared, not a submodule
        self.parts = nn.ModuleDict()

    in_features = property(lambda self: self.base_layer.in_features)
    out_features = property(lambda self: self.base_layer.out_features)
    weight = property(lambda self: self.base_layer.weight)  # for code that inspects q_proj.weight.dtype
    bias = property(lambda self: self.base_layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = [(p, self.ctx.rows[k]) for k, p in self.parts.items() if k in self.ctx.rows]
        for _, rows in active:
            if rows.shape[0] != x.shape[0]:
                raise ValueError(f"MultiUserLinear got {x.shape[0]} rows but the row context has {rows.shape[0]}; "
                                 "call MultiUserModel.set_rows for this batch first")
        h = x
        for part, rows in active:
            h = part.pre(h, rows)
        result = self.base_layer(h)
        for part, rows in active:
            result = part.post(x, result, rows)
        return result


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return (root.get_submodule(parent) if parent else root), name


def wrap_linear(root: nn.Module, path: str, ctx: RowContext) -> MultiUserLinear:
    """Replace the nn.Linear at `path` (e.g. "model.layers.0.self_attn.q_proj") by a MultiUserLinear."""
    parent, name = _parent(root, path)
    child = getattr(parent, name, None)
    if isinstance(child, MultiUserLinear):
        if child.ctx is not ctx:
            raise RuntimeError(f"{path!r} is already wrapped by another MultiUserModel; unwrap or detach it first")
        return child
    if not isinstance(child, nn.Linear):
        raise ValueError(f"cannot wrap {path!r}: expected an nn.Linear, found {type(child).__name__}; "
                         "the engine's LoRA/IA3 support linear target modules only")
    wrapped = MultiUserLinear(child, ctx)
    setattr(parent, name, wrapped)
    return wrapped


def restore_linear(root: nn.Module, path: str, wrapped: MultiUserLinear) -> None:
    parent, name = _parent(root, path)
    if getattr(parent, name) is not wrapped:
        raise RuntimeError(f"{path!r} was replaced by someone else while wrapped; refusing to overwrite it")
    setattr(parent, name, wrapped.base_layer)


def reinstate_linear(root: nn.Module, path: str, wrapped: MultiUserLinear) -> None:
    """Put a wrapper back after `restore_linear` took it out (MultiUserModel.detached)."""
    parent, name = _parent(root, path)
    setattr(parent, name, wrapped)


class LayerBank:
    """What the layer-level PEFT types' banks share: their parts are `parts[name]` of the wrapped
    layers; growing, resetting and listing parameters go through every such part."""

    name = ""

    def __init__(self, mm) -> None:
        self.mm = mm

    def parts(self) -> list[nn.Module]:
        return [w.parts[self.name] for w in self.mm.layers().values() if self.name in w.parts]

    def grow(self, slots: int) -> None:
        for p in self.parts():
            p.ensure(slots)

    def reset(self, slot: int) -> None:
        for p in self.parts():
            p.reset(slot)

    def params(self) -> list[nn.Parameter]:
        return [t for p in self.parts() for t in p.banks()]

    def prepare(self, inputs: dict, att: torch.Tensor, slots: torch.Tensor) -> tuple[dict, torch.Tensor]:
        return inputs, att  # a layer-level type changes no model input
