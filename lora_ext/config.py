"""``LoraConfig``: the adapter's hyper-parameters, equal to PEFT's ``adapter_config.json``."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

# Keys of PEFT's LoraConfig that change what an adapter computes and that lora_ext does
# not implement: a config that sets them to anything but the listed neutral values is
# refused instead of being silently mis-applied.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "use_qalora": (False, None),
    "layer_replication": (None,),
    "layers_to_transform": (None, []),
    "layers_pattern": (None, [], ""),
    "target_parameters": (None, []),
    "alora_invocation_tokens": (None,),
    "trainable_token_indices": (None,),
    "use_bdlora": (None, False),
    "arrow_config": (None,),
    "megatron_config": (None,),
}
_OWN_FIELDS = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "use_rslora",
    "init_lora_weights",
    "rank_pattern",
    "alpha_pattern",
    "bias",
    "modules_to_save",
    "fan_in_fan_out",
)


def valid_dropout(p) -> bool:
    """A dropout probability: a real number (not a bool or a string) with 0 <= p < 1."""
    return isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p < 1.0


def _check_regex(pattern, what: str) -> None:
    if not isinstance(pattern, str):
        raise ValueError(f"LoraConfig: expected {what} to be a regex string, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"LoraConfig: {what} {pattern!r} is not a valid regular expression: {e}") from None


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@dataclass
class LoraConfig:
    """LoRA hyper-parameters with PEFT's names and meaning.

    ``target_modules``: a list of names matched exactly or as a ``.suffix`` of a module path,
    a regex string matched with ``re.fullmatch``, or ``"all-linear"``. ``rank_pattern`` /
    ``alpha_pattern`` map a regex (PEFT's ``(.*\\.)?(pattern)$`` match) to a per-layer r / alpha.
    ``to_dict()`` / ``from_dict()`` read and write PEFT's ``adapter_config.json`` content;
    PEFT keys lora_ext does not use are kept in ``extra`` and written back unchanged.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    fan_in_fan_out: bool = False
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig: expected an integer r >= 1, got {self.r!r}")
        if not _positive_number(self.lora_alpha):
            raise ValueError(f"LoraConfig: expected a finite lora_alpha > 0, got {self.lora_alpha!r}")
        if not valid_dropout(self.lora_dropout):
            raise ValueError(f"LoraConfig: expected a number 0 <= lora_dropout < 1, got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig: expected bias in ('none', 'all', 'lora_only'), got {self.bias!r}")
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            v = getattr(self, name)
            if isinstance(v, (set, tuple)):
                setattr(self, name, sorted(v))
            elif v is not None and not isinstance(v, (str, list)):
                raise ValueError(f"LoraConfig: expected {name} to be a list of names or a regex string, got {v!r}")
            v = getattr(self, name)
            if isinstance(v, list) and not all(isinstance(n, str) for n in v):
                raise ValueError(f"LoraConfig: expected {name} to hold module names (str), got {v!r}")
            if isinstance(v, str) and name != "modules_to_save":
                _check_regex(v, name)
        for name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"LoraConfig: expected {name} to be a dict of regex -> value")
            for k in getattr(self, name):
                _check_regex(k, f"{name} key")
        for k, v in self.rank_pattern.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LoraConfig: rank_pattern[{k!r}] must be an integer >= 1, got {v!r}")
        for k, v in self.alpha_pattern.items():
            if not _positive_number(v):
                raise ValueError(f"LoraConfig: alpha_pattern[{k!r}] must be a finite number > 0, got {v!r}")
        for name in ("use_rslora", "fan_in_fan_out"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LoraConfig: expected {name} to be true or false, got {getattr(self, name)!r}")
        bad = {k: v for k, v in self.extra.items() if k in _UNSUPPORTED and v not in _UNSUPPORTED[k]}
        if bad:
            raise ValueError(
                f"LoraConfig: these PEFT options are not supported by lora_ext and would change results: {bad}"
            )
        peft_type = self.extra.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"LoraConfig: expected peft_type 'LORA', got {peft_type!r}")

    def to_dict(self) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` content."""
        d = {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": None,
            "inference_mode": True,
            "use_dora": False,
            "lora_bias": False,
        }
        d.update(copy.deepcopy(self.extra))
        for name in _OWN_FIELDS:
            d[name] = copy.deepcopy(getattr(self, name))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoraConfig":
        own = {k: copy.deepcopy(d[k]) for k in _OWN_FIELDS if k in d}
        extra = {k: copy.deepcopy(v) for k, v in d.items() if k not in _OWN_FIELDS}
        return cls(**own, extra=extra)

    def replace(self, **changes) -> "LoraConfig":
        return dataclasses.replace(self, **changes)
