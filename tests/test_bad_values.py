"""Non-finite and absurd values: NaN/Inf adapters are refused on load (opt-out) and never merged,
ranks above min(in, out), alpha <= 0 and a config whose r disagrees with the tensors are clear
errors, and nothing is changed when they are raised (Python and the C++ reader/merge)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lora_ext
from lora_ext import LoraConfig
from lora_ext.io.adapter import CONFIG_NAME, WEIGHTS_NAME

KEY_A = "base_model.model.0.lora_A.weight"


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not list(lora_ext.lora_layers(model))


def _assert_load_refused(folder, match):
    """load_adapter raises a ValueError matching ``match`` and leaves a fresh model untouched."""
    model = _model()
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        lora_ext.load_adapter(model, str(folder))
    _assert_unchanged(model, before)


def _saved(tmp_path, r=4, **cfg):
    model = lora_ext.inject_adapter(
        _model(), LoraConfig(r=r, target_modules=["0", "2"], init_lora_weights=False, **cfg)
    )
    return model, lora_ext.save_adapter(model, str(tmp_path / "ad"))


def _rewrite(folder, edit_tensors=None, edit_config=None, keep_metadata=False):
    """Edit a saved folder as a PEFT-style writer would (no lora_ext metadata unless kept)."""
    st = os.path.join(folder, WEIGHTS_NAME)
    tensors = load_file(st)
    if edit_tensors:
        edit_tensors(tensors)
    meta = {"format": "pt"}
    if keep_metadata:
        from safetensors import safe_open

        with safe_open(st, "pt") as f:
            meta = f.metadata()
    save_file(tensors, st, metadata=meta)
    if edit_config:
        with open(os.path.join(folder, CONFIG_NAME)) as f:
            cfg = json.load(f)
        edit_config(cfg)
        with open(os.path.join(folder, CONFIG_NAME), "w") as f:
            json.dump(cfg, f)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_adapter_is_refused_on_load(tmp_path, value):
    _, folder = _saved(tmp_path)

    def poison(t):
        t[KEY_A][1, 2] = value

    _rewrite(folder, poison, keep_metadata=True)
    model = _model()
    before = _state(model)
    with pytest.raises(ValueError, match=r"NaN/Inf values in \['base_model.model.0.lora_A.weight'\]"):
        lora_ext.load_adapter(model, folder)
    _assert_unchanged(model, before)
    with pytest.raises(RuntimeError, match=r"NaN/Inf values in .*\n  base_model.model.0.lora_A.weight"):
        lora_ext._C.load_adapter_native(folder)
    lora_ext.load_adapter(model, folder, allow_nonfinite=True)  # opt-out
    _, tensors = lora_ext._C.load_adapter_native(folder, allow_nonfinite=True)
    assert not torch.isfinite(tensors[KEY_A]).all()


@pytest.mark.parametrize("exact", [False, True])
def test_nonfinite_adapter_is_never_merged(exact):
    layer = lora_ext.LoraLinear(nn.Linear(12, 10), r=3, init_lora_weights=False)
    with torch.no_grad():
        layer.lora_B["default"].weight[4, 1] = float("nan")
    w = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"LoraLinear.merge: adapter 'default' holds non-finite \(NaN/Inf\) values"):
        layer.merge(exact=exact)
    assert torch.equal(layer.weight, w) and not layer.merged


def test_cpp_merge_refuses_nonfinite_adapter_before_changing_anything(tmp_path):
    model, folder = _saved(tmp_path)
    _rewrite(
        folder, lambda t: t["base_model.model.2.lora_B.weight"].__setitem__((0, 0), float("inf")), keep_metadata=True
    )
    base = torch.jit.script(_model())
    src, out = str(tmp_path / "m.pt"), str(tmp_path / "merged.pt")
    base.save(src)
    with pytest.raises(RuntimeError, match="NaN/Inf"):  # the reader refuses first ...
        lora_ext._C.merge_adapter_into_script_file(src, folder, out)
    assert not os.path.exists(out)


def test_rank_above_min_in_out_is_refused():
    with pytest.raises(ValueError, match=r"LoraLinear.add_adapter: expected r <= min\(in, out\) = 6 .* got r=7"):
        lora_ext.LoraLinear(nn.Linear(12, 6), r=7)
    lora_ext.LoraLinear(nn.Linear(12, 6), r=6)  # the limit itself is fine
    with pytest.raises(ValueError, match=r"LoraConv.add_adapter: expected r <= min\(in, out\) = 5"):
        lora_ext.layers.conv.LoraConv(nn.Conv2d(3, 5, 3), r=6)
    model = _model()
    before = _state(model)
    cfg = LoraConfig(r=4, target_modules=["0", "2"], rank_pattern={"2": 9})
    with pytest.raises(
        ValueError, match=r"the model was not changed:\n  '2': expected r <= min\(in, out\) = 6, got r=9"
    ):
        lora_ext.inject_adapter(model, cfg)
    _assert_unchanged(model, before)


def test_rank_above_min_in_out_in_a_file_is_refused(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    save_file(
        {"base_model.model.2.lora_A.weight": torch.randn(8, 10), "base_model.model.2.lora_B.weight": torch.randn(6, 8)},
        str(folder / WEIGHTS_NAME),
    )
    (folder / CONFIG_NAME).write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["2"]})
    )
    _assert_load_refused(folder, r"rank too large at '2': expected r <= min\(in, out\) = 6, got r=8")


@pytest.mark.parametrize("alpha", [0, -1.5, float("nan"), float("inf"), True, "8"])
def test_alpha_must_be_a_positive_number(alpha, tmp_path):
    with pytest.raises(ValueError, match="lora_alpha > 0"):
        LoraConfig(lora_alpha=alpha)
    with pytest.raises(ValueError, match="lora_alpha > 0"):
        lora_ext.LoraLinear(nn.Linear(4, 4), r=2, lora_alpha=alpha)
    with pytest.raises(ValueError, match=r"alpha_pattern\['x'\] must be a finite number > 0"):
        LoraConfig(alpha_pattern={"x": alpha})
    _, folder = _saved(tmp_path)
    _rewrite(folder, edit_config=lambda c: c.__setitem__("lora_alpha", alpha))  # a PEFT-written file
    _assert_load_refused(
        folder,
        r"lora_ext.load_adapter: .*adapter_config.json: LoraConfig: expected a finite "
        r"lora_alpha > 0",
    )


def test_config_r_disagreeing_with_tensors(tmp_path):
    _, folder = _saved(tmp_path, r=4)
    _rewrite(folder, edit_config=lambda c: c.__setitem__("r", 3))  # no embedded config: the file's r is used
    _assert_load_refused(
        folder,
        r"shape mismatch at '0': expected A \(3, 12\) and B \(10, 3\) \(r from the "
        r"config\), got \(4, 12\) and \(10, 4\)",
    )


def test_cpp_reader_uses_the_weights_own_config_after_an_interrupted_save(tmp_path):
    """The crash state (new weights, old config) read by the C++ reader: the weights' config wins."""
    new, a = _saved(tmp_path / "n", r=4, lora_alpha=3)
    _, b = _saved(tmp_path / "o", r=2, lora_alpha=7)
    os.replace(os.path.join(b, CONFIG_NAME), os.path.join(a, CONFIG_NAME))
    with pytest.warns(UserWarning, match="does not match the config saved with the weights"):
        cfg, tensors = lora_ext._C.load_adapter_native(a)
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 3.0)
    assert tensors[KEY_A].shape == (4, 12)


def _write_config(folder, text):
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        f.write(text)


BROKEN_FOLDERS = {  # edit of a saved folder (weights rewritten without lora_ext's embedded config) -> error
    "folder missing": (
        lambda d: os.rename(d, d + ".gone"),
        FileNotFoundError,
        r"lora_ext.load_adapter: no adapter_model.safetensors in '.*ad'",
    ),
    "no weights file": (
        lambda d: os.remove(os.path.join(d, WEIGHTS_NAME)),
        FileNotFoundError,
        r"lora_ext.load_adapter: no adapter_model.safetensors in '.*ad'",
    ),
    "no config file": (
        lambda d: os.remove(os.path.join(d, CONFIG_NAME)),
        FileNotFoundError,
        r"lora_ext.load_adapter: no adapter_config.json in '.*ad'",
    ),
    "config not JSON": (
        lambda d: _write_config(d, "{"),
        ValueError,
        r"lora_ext.load_adapter: .*adapter_config.json is not valid JSON: Expecting",
    ),
    "config not an object": (
        lambda d: _write_config(d, "[1]"),
        ValueError,
        r"lora_ext.load_adapter: .*adapter_config.json: expected a JSON object, got list",
    ),
    "config with use_dora": (
        lambda d: _write_config(
            d, json.dumps({"peft_type": "LORA", "r": 4, "use_dora": True, "target_modules": ["0", "2"]})
        ),
        ValueError,
        r"adapter_config.json: LoraConfig: these PEFT options are not supported by lora_ext "
        r"and would change results: \{'use_dora': True\}",
    ),
    "weights not safetensors": (
        lambda d: open(os.path.join(d, WEIGHTS_NAME), "wb").write(b"\xff" * 64),
        ValueError,
        r"lora_ext.load_adapter: .*adapter_model.safetensors is not a valid safetensors file",
    ),
    "weights hold no LoRA keys": (
        lambda d: save_file({}, os.path.join(d, WEIGHTS_NAME)),
        ValueError,
        r"lora_ext.load_adapter: the adapter does not fit the model:\n  the file holds no "
        r"LoRA weights",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN_FOLDERS))
def test_broken_adapter_folders_raise_clear_errors(tmp_path, case):
    _, folder = _saved(tmp_path)
    _rewrite(folder)  # as PEFT writes it: the config lives only in adapter_config.json
    damage, exc, match = BROKEN_FOLDERS[case]
    damage(folder)
    model = _model()
    before = _state(model)
    with pytest.raises(exc, match=match):
        lora_ext.load_adapter(model, folder)
    _assert_unchanged(model, before)


def test_loading_a_name_the_model_already_has_is_refused(tmp_path):
    model, folder = _saved(tmp_path)
    before = _state(model)
    with pytest.raises(ValueError, match="lora_ext.load_adapter: adapter 'default' already exists in the model"):
        lora_ext.load_adapter(model, folder)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
