"""Saved adapters of tiny models and Hypothesis strategies that mutate their folders, for the property-based
tests of the adapter readers (test_properties_io.py: Python, test_properties_cpp_io.py: C++). A mutation is a
plain tuple, so a failing example prints as its own reproduction."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import struct
import tempfile

import torch
from hypothesis import event, note
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from safetensors.torch import load_file, save_file

import lora_ext
from lora_ext import LoraConfig
from models import TinyNet, tiny_llama

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


def effective_config_folder(folder):
    """A folder whose adapter_config.json is the config the readers use for ``folder``: lora_ext saves carry
    their exact config in the weights' safetensors metadata, and both readers prefer it when the folder's
    adapter_config.json differs or is missing (crash-safe saves, see lora_ext/adapter_io.py)."""
    from safetensors import safe_open

    try:
        with safe_open(os.path.join(folder, WEIGHTS), "pt") as f:
            text = (f.metadata() or {}).get(lora_ext.io.adapter.CONFIG_METADATA_KEY)
    except Exception:  # noqa: BLE001  (a file the readers refuse anyway)
        return folder
    if text is None:
        return folder
    out = tempfile.mkdtemp(prefix="effective_", dir=folder)
    with open(os.path.join(out, CONFIG), "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)
    return out


# ---- the models and their saved adapters (built once) --------------------------------------------


class Scenario:
    """A model factory, the adapter saved from it (``saved``), fresh copies to load into, and scratch space."""

    def __init__(self, name, make, cfg, other_cfg):
        self.name, self.make = name, make
        self.root = tempfile.mkdtemp(prefix=f"lora_ext_props_{name}_")
        atexit.register(shutil.rmtree, self.root, True)
        model = make()
        lora_ext.inject_adapter(model, cfg)
        self.saved = lora_ext.save_adapter(model, os.path.join(self.root, "saved"))
        self.fresh = make()  # no LoRA yet
        self.preloaded = make()  # already holds another adapter on some of the same modules
        lora_ext.inject_adapter(self.preloaded, other_cfg, "other")
        self.script = os.path.join(self.root, "base.pt")
        if name == "net":
            torch.jit.script(make()).save(self.script)


def _net():
    torch.manual_seed(0)
    return TinyNet().eval()


SCENARIOS = {}


def scenario(name):
    """``llama``: rank and alpha patterns; ``net``: embedding + linear LoRA, rsLoRA (and a TorchScript copy
    for the C++ merge); ``net_bias``: the same with bias="lora_only" (bias tensors in the file)."""
    if name not in SCENARIOS:
        if name == "llama":
            cfg = LoraConfig(
                r=4,
                lora_alpha=8,
                target_modules=["q_proj", "v_proj"],
                rank_pattern={"v_proj": 2},
                alpha_pattern={"q_proj": 3},
                init_lora_weights=False,
            )
            SCENARIOS[name] = Scenario(name, tiny_llama, cfg, LoraConfig(r=2, target_modules=["q_proj", "k_proj"]))
        else:
            cfg = LoraConfig(
                r=4,
                lora_alpha=8,
                target_modules=["emb", "l1", "l2"],
                use_rslora=True,
                rank_pattern={"l2": 2},
                bias="lora_only" if name == "net_bias" else "none",
                init_lora_weights=False,
            )
            SCENARIOS[name] = Scenario(name, _net, cfg, LoraConfig(r=3, target_modules=["l1"]))
    return SCENARIOS[name]


# ---- mutations ------------------------------------------------------------------------------------

KEYS = [
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
    "peft_type",
    "use_dora",
    "lora_bias",
    "layers_to_transform",
    "layers_pattern",
    "target_parameters",
    "task_type",
    "inference_mode",
]
NAMES = [
    "q_proj",
    "v_proj",
    "l1",
    "emb",
    "lm_head",
    ".*",
    "(",
    "all-linear",
    "LORA",
    "none",
    "all",
    "lora_only",
    "gaussian",
    "layers\\.0",
]
ATOMS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=6)
    | st.sampled_from(NAMES)
)
ABSURD = st.sampled_from(
    [0, -1, 1, 2, 3, 5, 8, 2**31, 2**63, 10**30, 4.0, 2.5, "4", True, None, float("nan"), float("inf"), -0.0, [], {}]
)
JSON = (
    st.recursive(
        ATOMS,
        lambda c: (
            st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6) | st.sampled_from(NAMES), c, max_size=3)
        ),
        max_leaves=5,
    )
    | ABSURD
)
FRACTION = st.floats(0.0, 1.0)
DTYPES = ["F16", "BF16", "F64", "F32", "I32", "I64", "U8", "BOOL", "F8_E4M3", "C64", "XX", 3, None]
ST_DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.bool, torch.uint8]
RESHAPES = ["transpose", "drop_row", "add_row", "flatten", "add_dim", "scalar", "empty"]
NEW_KEYS = [
    "{p}model.layers.0.self_attn.k_proj.lora_A.weight",
    "{p}model.layers.0.self_attn.q_proj.lora_A.default.weight",
    "{p}lm_head.weight",
    "{p}l1.bias",
    "{p}l3.lora_A.weight",
    "{p}emb.lora_A.weight",
    "{p}emb.lora_embedding_B",
    "{p}model.embed_tokens.lora_embedding_A",
    "foo",
    "",
    "{p}l1.lora_B.weight.extra",
]
SPECIAL = [float("nan"), float("inf"), float("-inf"), 1e30, 0.0, -0.0, 5e-324]

MUTATIONS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(KEYS) | st.text(max_size=8), JSON),
    st.tuples(
        st.just("set"),
        st.sampled_from(["rank_pattern", "alpha_pattern"]),  # per-module values
        st.dictionaries(
            st.sampled_from(NAMES + ["l2", "v_proj$", "layers\\.1"]), ABSURD | st.integers(-3, 9), max_size=2
        ),
    ),
    st.tuples(st.just("delete"), st.sampled_from(KEYS)),
    st.tuples(st.just("document"), JSON),
    st.tuples(st.just("cut"), st.sampled_from([CONFIG, WEIGHTS]), FRACTION),
    st.tuples(st.just("flip"), st.sampled_from([CONFIG, WEIGHTS]), FRACTION, st.integers(0, 7)),
    st.tuples(st.just("append"), st.sampled_from([CONFIG, WEIGHTS]), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("remove"), st.sampled_from([CONFIG, WEIGHTS])),
    st.tuples(
        st.just("header"),
        st.integers(0, 99),
        st.sampled_from(["dtype", "shape", "data_offsets"]),
        st.sampled_from(DTYPES) | JSON | st.lists(st.integers(-2, 2**40), max_size=3),
    ),
    st.tuples(st.just("name_byte"), st.integers(0, 40), st.integers(0, 255)),
    st.tuples(st.just("dtype"), st.integers(0, 99), st.sampled_from(ST_DTYPES)),
    st.tuples(st.just("reshape"), st.integers(0, 99), st.sampled_from(RESHAPES)),
    st.tuples(st.just("value"), st.integers(0, 99), FRACTION, st.sampled_from(SPECIAL)),
    st.tuples(st.just("add_key"), st.sampled_from(NEW_KEYS), st.sampled_from(["A", "B", "row"])),
    st.tuples(st.just("drop_key"), st.integers(0, 99)),
    st.tuples(st.just("metadata"), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2)),
)


def _reshaped(t, how):
    return {
        "transpose": lambda: t.T.contiguous() if t.dim() == 2 else t,
        "drop_row": lambda: t[:-1],
        "add_row": lambda: torch.cat([t, t[:1]]),
        "flatten": lambda: t.reshape(-1),
        "add_dim": lambda: t.unsqueeze(0),
        "scalar": lambda: t.reshape(-1)[0].clone(),
        "empty": lambda: t[:0],
    }[how]().contiguous()


def _edit_tensors(path, m):
    tensors, kind = load_file(path), m[0]
    keys = sorted(tensors)
    key = keys[m[1] % len(keys)] if keys and isinstance(m[1], int) else None
    if kind == "dtype":
        tensors[key] = tensors[key].to(m[2])
    elif kind == "reshape":
        tensors[key] = _reshaped(tensors[key], m[2])
    elif kind == "value":
        flat = tensors[key].reshape(-1)
        flat[min(int(m[2] * flat.numel()), flat.numel() - 1)] = m[3]
    elif kind == "add_key":
        shape = {"A": (4, 16), "B": (32, 4), "row": (8,)}[m[2]]
        tensors[m[1].format(p=PREFIX)] = torch.randn(shape)
    elif kind == "drop_key":
        del tensors[key]
    save_file(tensors, path, metadata=m[1] if kind == "metadata" else {"format": "pt"})


def _read(path):
    with open(path, "rb") as f:
        return bytearray(f.read())


def _write(path, data):
    with open(path, "wb") as f:
        f.write(bytes(data))


def mutate(folder, m):
    """Apply one mutation tuple to an adapter folder."""
    kind = m[0]
    cfg_path, st_path = os.path.join(folder, CONFIG), os.path.join(folder, WEIGHTS)
    if kind in ("set", "delete", "document"):
        d = json.loads(_read(cfg_path)) if kind != "document" else m[1]
        if kind == "set":
            d[m[1]] = m[2]
        elif kind == "delete":
            d.pop(m[1], None)
        _write(cfg_path, json.dumps(d).encode())
    elif kind == "remove":
        os.remove(os.path.join(folder, m[1]))
    elif kind in ("cut", "flip", "append"):
        path = os.path.join(folder, m[1])
        data = _read(path)
        if kind == "cut":
            data = data[: int(m[2] * len(data))]
        elif kind == "append":
            data += m[2]
        elif data:
            data[min(int(m[2] * len(data)), len(data) - 1)] ^= 1 << m[3]
        _write(path, data)
    elif kind == "name_byte":  # one byte of the first tensor name in the header (raw: any byte, UTF-8 or not)
        data = _read(st_path)
        data[data.index(b'"' + PREFIX.encode()) + 1 + m[1]] = m[2]
        _write(st_path, data)
    elif kind == "header":
        data = _read(st_path)
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + n])
        names = sorted(k for k in header if k != "__metadata__")
        header[names[m[1] % len(names)]][m[2]] = m[3]
        h = json.dumps(header).encode()
        _write(st_path, struct.pack("<Q", len(h)) + h + data[8 + n :])
    else:
        _edit_tensors(st_path, m)


def mutated_copy(sc, mutations):
    """A fresh copy of the scenario's saved adapter folder (one scratch folder, overwritten each call) with the
    mutations applied in order."""
    folder = os.path.join(sc.root, "mutated")
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(sc.saved, folder)
    for m in mutations:
        try:
            mutate(folder, m)
        except Exception as e:  # noqa: BLE001  (a mutation that does not apply to what earlier ones left)
            _note(f"mutation {m} not applied: {type(e).__name__}: {e}")
    return folder


def _note(msg, as_event=False):
    """hypothesis.note (or .event: counted in --hypothesis-show-statistics), a no-op outside a Hypothesis test."""
    try:
        (event if as_event else note)(msg)
    except InvalidArgument:
        pass
