"""Writes the fuzz harnesses' seed corpus, tests/fuzz/corpus/<harness>/ (committed; rerun after a
format change):

    bash scripts/run.sh tests/fuzz/make_corpus.py

- adapter folders written by PEFT and by lora_ext for `Net`, the twin of the network in
  fuzz_load_apply.cpp (Embedding, Linear fp32/bf16/fp16 in a ModuleList, Conv2d): plain, rsLoRA with
  rank/alpha patterns and a regex target, modules_to_save, fan_in_fan_out, and mismatched ones
  (the cases of tests/test_cpp_apply.py);
- every malformed safetensors file and adapter_config.json of lora_ext_dev/hostile_files.py (tests/test_cpp_reader.py);
- safetensors files of every dtype (empty and 0-dim tensors, metadata) from the safetensors library
  and from the C++ writer.
load_apply inputs are adapter_config.json, one NUL byte, adapter_model.safetensors. Files named regress_*
are inputs that once crashed a harness (or broke a property it checks); they are kept as they are."""

import json
import pathlib
import tempfile

import peft
import torch
from safetensors.torch import save_file
from torch import nn

import lora_ext
from lora_ext_dev.hostile_files import BAD, BAD_CONFIGS, DTYPES
from lora_ext_dev.hostile_files import write as _write

HERE = pathlib.Path(__file__).resolve().parent


OUT = HERE / "corpus"
TARGETS = ["emb", "l1", "q", "v", "conv"]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(6, 6).to(torch.bfloat16)
        self.v = nn.Linear(6, 6).to(torch.float16)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.l1 = nn.Linear(8, 6)
        self.blocks = nn.ModuleList([Block()])
        self.conv = nn.Conv2d(3, 4, 2)


def peft_adapter(folder, **kw):
    torch.manual_seed(0)
    model = peft.get_peft_model(Net(), peft.LoraConfig(init_lora_weights=False, **kw))
    model.save_pretrained(str(folder))


def lora_ext_adapter(folder, **kw):
    torch.manual_seed(0)
    model = Net()
    lora_ext.inject_adapter(model, lora_ext.LoraConfig(init_lora_weights=False, **kw))
    lora_ext.save_adapter(model, str(folder))


ADAPTERS = {
    "peft_plain": (peft_adapter, dict(r=2, lora_alpha=4, target_modules=TARGETS)),
    "peft_patterns": (
        peft_adapter,
        dict(
            r=3,
            lora_alpha=8,
            use_rslora=True,
            target_modules=r".*\.(q|v)|l1|conv",
            rank_pattern={"q": 2, "conv": 1},
            alpha_pattern={r"blocks\.0\.v": 3},
        ),
    ),
    "peft_modules_to_save": (peft_adapter, dict(r=1, target_modules=["l1"], modules_to_save=["conv"])),
    "lora_ext_plain": (lora_ext_adapter, dict(r=2, lora_alpha=2, target_modules=TARGETS)),
    "lora_ext_patterns": (
        lora_ext_adapter,
        dict(
            r=4,
            lora_alpha=16,
            use_rslora=True,
            target_modules=["q", "v", "emb"],
            rank_pattern={"emb": 1},
            alpha_pattern={"v": 5},
        ),
    ),
}


def st_bytes(tensors, metadata=None):
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / "x.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        return path.read_bytes()


def write(harness, name, data):
    folder = OUT / harness
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def adapter_files(folder):
    return (folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes()


def mismatched(config, tensors_bytes):
    """The mismatches of tests/test_cpp_apply.py, for Net."""
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / "a.safetensors"
        path.write_bytes(tensors_bytes)
        t = lora_ext._C.read_safetensors(str(path))
    extra = dict(
        t,
        **{
            "base_model.model.nothing.lora_A.weight": torch.zeros(2, 8),
            "base_model.model.nothing.lora_B.weight": torch.zeros(6, 2),
        },
    )
    wrong = dict(t, **{"base_model.model.l1.lora_A.weight": torch.zeros(2, 7)})
    lone = {k: v for k, v in t.items() if k != "base_model.model.l1.lora_A.weight"}
    lone["base_model.model.l1.bias"] = torch.zeros(6)
    fan = json.dumps(dict(json.loads(config), fan_in_fan_out=True)).encode()
    return {
        "extra_key": (config, st_bytes(extra)),
        "wrong_shape": (config, st_bytes(wrong)),
        "lone_a_and_bias": (config, st_bytes(lone)),
        "fan_in_fan_out": (fan, tensors_bytes),
    }


def main():
    for f in OUT.rglob("*"):  # regenerate everything but the regression inputs (crashes found, kept by hand)
        if f.is_file() and not f.name.startswith("regress_"):
            f.unlink()
    with tempfile.TemporaryDirectory() as d:
        for name, (make, kw) in ADAPTERS.items():
            make(pathlib.Path(d) / name, **kw)
            config, tensors = adapter_files(pathlib.Path(d) / name)
            write("safetensors", f"{name}.safetensors", tensors)
            write("adapter_config", f"{name}.json", config)
            write("load_apply", name, config + b"\0" + tensors)
        for name, (config, tensors) in mismatched(*adapter_files(pathlib.Path(d) / "peft_plain")).items():
            write("load_apply", name, config + b"\0" + tensors)
        # every malformed file of tests/test_cpp_reader.py
        for case, (spec, _) in BAD.items():
            path = pathlib.Path(d) / "bad.safetensors"
            if spec is None:
                path.write_bytes(b"\x01\x02")
            else:
                _write(path, *spec)
            write("safetensors", f"bad_{case.replace(' ', '_')}.safetensors", path.read_bytes())
        for i, (content, _) in enumerate(BAD_CONFIGS):
            write("adapter_config", f"bad_{i}.json", content)
            write("load_apply", f"bad_config_{i}", content.encode() + b"\0" + st_bytes({"x": torch.ones(1)}))
    # every dtype, empty / 0-dim tensors and metadata; a truncated file; the C++ writer's output
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": (torch.randn(2, 3, generator=g) * 10).to(dt) for i, dt in enumerate(DTYPES)}
    tensors.update(empty=torch.empty(0, 7), scalar=torch.tensor(3.5))
    data = st_bytes(tensors, metadata={"format": "pt", "note": "hello"})
    write("safetensors", "every_dtype.safetensors", data)
    write("safetensors", "truncated.safetensors", data[:-10])
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / "cpp.safetensors"
        lora_ext._C.write_safetensors(
            str(path),
            {"strided": torch.randn(6, 8, generator=g)[::2, 1::3], "bf16": torch.randn(3, generator=g).bfloat16()},
            {"who": "c++"},
        )
        write("safetensors", "cpp_writer.safetensors", path.read_bytes())
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {sum(1 for f in OUT.rglob('*') if f.is_file())} files, {total} bytes, under {OUT}")


if __name__ == "__main__":
    main()
