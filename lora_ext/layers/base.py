"""Adapter bookkeeping shared by every LoRA layer type.

Adapters are kept by name with PEFT's in-memory names, so saving PEFT files is a key
rename: ``base_layer.weight``, ``base_layer.bias``, ``lora_A.<name>.weight`` ``[r, in]``,
``lora_B.<name>.weight`` ``[out, r]``.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .. import ops
from .._utils import dtensors
from .._utils.names import adapter_name_list, check_adapter_name
from ..config import valid_dropout

_INIT_CHOICES = (True, False, "gaussian")


class AdapterWeight(nn.Module):
    """Holds one adapter matrix as ``.weight`` (so its state-dict key ends in ``.weight``)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, dtype={self.weight.dtype}"


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters on a bfloat16/float16 base are kept in float32 (PEFT's default)."""
    return torch.float32 if base_dtype in (torch.bfloat16, torch.float16) else base_dtype


class LoraLayer(nn.Module):
    """Base class: a frozen ``base_layer`` plus any number of named adapters.

    Every layer type holds its adapters the same way: two containers named
    ``container_names`` (PEFT's in-memory names), either ``ModuleDict``s of
    :class:`AdapterWeight` (keys ``<container>.<name>.weight``) or, with
    ``adapter_as_parameters``, ``ParameterDict``s (keys ``<container>.<name>``). Subclasses
    define ``adapter_shapes`` (A's and B's shapes for a base module and a rank), ``forward``,
    and, when the base weight is not ``[out, in]``, ``_merge_operands``.
    """

    container_names: tuple[str, str] = ("lora_A", "lora_B")
    adapter_as_parameters: bool = False
    # suffixes of PEFT's file keys: base_model.model.<path><suffix>
    file_suffixes: tuple[str, str] = (".lora_A.weight", ".lora_B.weight")
    base_types: tuple[type, ...] = ()
    # Set by lora_ext.distributed.tensor_parallel's styles on a layer they parallelized: gives a new adapter's
    # A and B that layer's DTensor placements (``place(a, b)``). None: a plain layer.
    _tp_layout = None

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: Union[bool, str] = True,
        adapter_name: Optional[str] = "default",
    ):
        self.check_base(base_layer)
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        for c in self.container_names:
            setattr(self, c, nn.ParameterDict() if self.adapter_as_parameters else nn.ModuleDict())
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}
        self._active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._exact_codes: dict[str, tuple] = {}  # adapter -> (ExactMergeCodes, adapter versions)
        self.disable_adapters: bool = False
        if adapter_name is not None:  # None: no adapter yet (the model-level API adds them)
            self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        """Whether this layer type can wrap ``module``."""
        return isinstance(module, cls.base_types)

    @classmethod
    def check_base(cls, base_layer: nn.Module) -> None:
        if not cls.accepts(base_layer):
            names = ", ".join(t.__name__ for t in cls.base_types) or "a supported module"
            raise TypeError(f"{cls.__name__}: expected a base layer of type {names}, got {type(base_layer).__name__}")

    # -- subclass hooks -------------------------------------------------------------------
    @classmethod
    def adapter_shapes(cls, base_layer: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of A and B for a rank-r adapter on ``base_layer``."""
        raise NotImplementedError

    @classmethod
    def max_rank(cls, base_layer: nn.Module) -> int:
        """The largest useful rank: ``min(fan_in, fan_out)`` of ``base_layer`` (a larger ``B @ A``
        has no more rank, only more parameters)."""
        shape_a, shape_b = cls.adapter_shapes(base_layer, 1)
        return min(math.prod(shape_a[1:]), shape_b[0])

    def _base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def _init_weights(self, a: torch.Tensor, b: torch.Tensor, r: int, init: Union[bool, str]) -> None:
        with torch.no_grad():
            if init is True:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.zeros_(b)
            elif init == "gaussian":
                nn.init.normal_(a, std=1.0 / r)
                nn.init.zeros_(b)
            else:  # False: both random, so the adapter changes outputs (tests, debugging)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))

    def _merge_operands(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(W, A, B)`` as ``[out, in]``, ``[r, in]``, ``[out, r]`` views for the merge kernels."""
        return self._base_weight(), *self.adapter_weights(name)

    # -- storage --------------------------------------------------------------------------
    def adapter_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The parameters ``(A, B)`` of adapter ``name``."""
        a, b = (getattr(self, c)[name] for c in self.container_names)
        return (a, b) if self.adapter_as_parameters else (a.weight, b.weight)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def has_adapter(self, name: str) -> bool:
        return name in self.r

    def _store(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        for c, t in zip(self.container_names, (a, b)):
            getattr(self, c)[name] = nn.Parameter(t) if self.adapter_as_parameters else AdapterWeight(t)

    # -- adapters -------------------------------------------------------------------------
    def add_adapter(
        self,
        adapter_name: str,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: Union[bool, str] = True,
    ) -> None:
        """Add an adapter named ``adapter_name``; the first adapter added becomes active."""
        check_adapter_name(adapter_name, f"{type(self).__name__}.add_adapter")
        if self.has_adapter(adapter_name):
            raise ValueError(f"LoraLayer.add_adapter: adapter {adapter_name!r} already exists")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"LoraLayer.add_adapter: expected an integer rank r >= 1, got {r!r}")
        if isinstance(lora_alpha, bool) or not (
            isinstance(lora_alpha, (int, float)) and math.isfinite(lora_alpha) and lora_alpha > 0
        ):
            raise ValueError(f"LoraLayer.add_adapter: expected a finite lora_alpha > 0, got {lora_alpha!r}")
        if not valid_dropout(lora_dropout):
            raise ValueError(f"LoraLayer.add_adapter: expected a number 0 <= lora_dropout < 1, got {lora_dropout!r}")
        if not (init_lora_weights is True or init_lora_weights is False or init_lora_weights == "gaussian"):
            raise ValueError(
                f"LoraLayer.add_adapter: expected init_lora_weights in {_INIT_CHOICES}, got {init_lora_weights!r}"
            )
        limit = self.max_rank(self.base_layer)
        if r > limit:
            raise ValueError(
                f"{type(self).__name__}.add_adapter: expected r <= min(in, out) = {limit} for a base "
                f"layer of weight shape {tuple(self._base_weight().shape)}, got r={r}"
            )
        base_w = self._base_weight()
        dtype = adapter_dtype(base_w.dtype)
        shape_a, shape_b = self.adapter_shapes(self.base_layer, r)
        a = torch.empty(shape_a, dtype=dtype, device=base_w.device)
        b = torch.empty(shape_b, dtype=dtype, device=base_w.device)
        self._init_weights(a, b, r, init_lora_weights)
        if self._tp_layout is not None:  # tensor parallel: the same placements as the layer's other adapters
            a, b = self._tp_layout.place(a, b)
        self._store(adapter_name, a, b)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = float(lora_dropout)
        self.use_rslora[adapter_name] = bool(use_rslora)
        self.scaling[adapter_name] = lora_scaling(r, lora_alpha, use_rslora)
        if not self._active_adapters:
            self._active_adapters = [adapter_name]

    def _check_names(self, names: Iterable[str], where: str) -> list[str]:
        names = adapter_name_list(names, f"{type(self).__name__}.{where}")
        missing = [n for n in names if not self.has_adapter(n)]
        if missing:
            raise ValueError(f"{type(self).__name__}.{where}: unknown adapter(s) {missing}; have {self.adapter_names}")
        return names

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> Optional[str]:
        return self._active_adapters[0] if self._active_adapters else None

    def set_adapter(self, adapter_names: Union[str, list[str]]) -> None:
        """Make ``adapter_names`` (a name or a list of names) the active adapter(s)."""
        names = self._check_names(adapter_names, "set_adapter")
        if self.merged:
            warnings.warn("LoRA adapters are merged; unmerging before switching adapters", stacklevel=2)
            self.unmerge()
        self._active_adapters = names

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (unmerging first if it is merged)."""
        self._check_names([adapter_name], "delete_adapter")
        if adapter_name in self.merged_adapters:
            self.unmerge()
        for c in self.container_names:
            del getattr(self, c)[adapter_name]
        for d in (self.r, self.lora_alpha, self.lora_dropout, self.use_rslora, self.scaling):
            d.pop(adapter_name)
        self._active_adapters = [n for n in self._active_adapters if n != adapter_name]
        if not self._active_adapters and self.adapter_names:
            self._active_adapters = [self.adapter_names[0]]

    def _adapters_for_forward(self) -> list[str]:
        """The adapters whose terms forward adds to the base output: none when adapters are
        disabled (merged ones are unmerged first) or merged into the weight."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return []
        return [] if self.merged else list(self._active_adapters)

    # -- merging --------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merge(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False, exact: bool = False) -> None:
        """Add the adapters' ``scale * B @ A`` into the base weight in place.

        After merging, forward is the plain base layer. ``safe_merge=True`` first checks, in
        bounded row chunks, that the merged weight would be finite, and raises without touching
        the weight if it would not. ``exact=True`` (float32/bfloat16/float16 weights) keeps 2 bits
        per weight element (plus a sparse list of rare exceptions) so that :meth:`unmerge`
        restores the original weight bit for bit.
        """
        names = self._check_names(self._active_adapters if adapter_names is None else adapter_names, "merge")
        todo = [n for n in names if n not in self.merged_adapters]
        if len(todo) < len(names):
            warnings.warn(f"already merged: {[n for n in names if n in self.merged_adapters]}", stacklevel=2)
        with torch.no_grad():
            for n in todo:  # always: a NaN/Inf adapter would poison the weight for good
                if not all(dtensors.all_finite(t) for t in self.adapter_weights(n)):
                    raise ValueError(
                        f"{type(self).__name__}.merge: adapter {n!r} holds non-finite (NaN/Inf) "
                        "values; the weight was left unchanged"
                    )
            if safe_merge:
                for n in todo:
                    self._check_finite_merge(n)
            for n in todo:
                w, a, b = self._merge_operands(n)
                if exact:  # sharded weights: each rank keeps the side information of its own shard
                    lw, la, lb = dtensors.local_operands(w, a, b)
                    codes = ops.merge_exact_codes(lw, la, lb, self.scaling[n])
                    ops.merge_exact_(lw, la, lb, self.scaling[n])
                    self._exact_codes[n] = (codes, (a._version, b._version))
                else:
                    if dtensors.is_dtensor(w):
                        dtensors.register_strategies()  # local merge + one all-gather of a factor
                    ops.merge_(w, a, b, self.scaling[n])
                self.merged_adapters.append(n)

    def unloaded_base(self, merge: bool) -> nn.Module:
        """The plain base module that replaces this layer in ``merge_and_unload`` (``merge=True``: the active
        adapters merged into it, unless adapters are disabled) or ``unload``."""
        if merge and not self.disable_adapters:
            if not self.merged and self.active_adapters:
                self.merge(self.active_adapters)
        elif self.merged:
            self.unmerge()
        return self.base_layer

    def exact_merge_nbytes(self) -> int:
        """Bytes of side information held for exactly merged adapters."""
        return sum(c.nbytes() for c, _ in self._exact_codes.values())

    def _check_finite_merge(self, name: str, rows: int = 256) -> None:
        operands = self._merge_operands(name)
        w, a, b = dtensors.local_operands(*operands)  # this rank's shard of a sharded weight
        a = a.float()
        s = self.scaling[name]
        finite = True
        for i in range(0, w.shape[0], rows):
            chunk = w[i : i + rows].float() + s * (b[i : i + rows].float() @ a)
            finite = finite and bool(torch.isfinite(chunk.to(w.dtype)).all())
        if not dtensors.all_ranks_true(finite, operands[0]):  # every rank raises, or none
            raise ValueError(
                f"{type(self).__name__}.merge(safe_merge=True): merging adapter {name!r} would produce "
                "non-finite weights; the weight was left unchanged"
            )

    def unmerge(self) -> None:
        """Subtract every merged adapter from the base weight (in reverse merge order)."""
        with torch.no_grad():
            while self.merged_adapters:
                n = self.merged_adapters.pop()
                w, a, b = self._merge_operands(n)
                exact = self._exact_codes.pop(n, None)
                if exact is not None and exact[1] == (a._version, b._version):
                    lw, la, lb = dtensors.local_operands(w, a, b)
                    ops.unmerge_exact_(lw, exact[0].to(lw.device), la, lb, self.scaling[n])
                else:
                    if exact is not None:
                        warnings.warn(f"adapter {n!r} changed while merged: unmerging it inexactly", stacklevel=2)
                    if dtensors.is_dtensor(w):
                        dtensors.register_strategies()
                    ops.unmerge_(w, a, b, self.scaling[n])
