"""Saving adapters safely: names never escape the folder, files get the umask's permissions,
and a crash (kill -9) at any moment of an overwrite leaves exactly the old or the new adapter."""
import multiprocessing as mp
import os
import random
import signal
import stat
import time
import warnings

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import LoraConfig
from lora_ext.io.adapter import CONFIG_NAME, WEIGHTS_NAME

BAD_NAMES = {
    "/abs/elsewhere": "absolute path",
    "../up": "path separator",
    "a/b": "path separator",
    "a\\b": "path separator",
    "..": "'.' or '..'",
    ".": "'.' or '..'",
    "": "not only whitespace",
    "   ": "not only whitespace",
    "a\x00b": "control characters",
    "tab\there": "control characters",
    "new\nline": "control characters",
    "dotted.name": "no '.'",
    "__base__": "reserved",
    5: "expected a str",
}


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 20))


@pytest.mark.parametrize("name", list(BAD_NAMES), ids=repr)
def test_bad_adapter_names_are_refused_everywhere(name, tmp_path):
    rule = BAD_NAMES[name]
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = LoraConfig(r=2, target_modules=["0", "2"])
    with pytest.raises(ValueError, match=f"lora_ext.inject_adapter: invalid adapter name .*{rule}"):
        lora_ext.inject_adapter(model, cfg, name)
    assert not list(lora_ext.lora_layers(model)) and model.state_dict().keys() == before.keys()
    with pytest.raises(ValueError, match=f"LoraLinear.add_adapter: invalid adapter name .*{rule}"):
        lora_ext.LoraLinear(nn.Linear(4, 4), r=2, adapter_name=name)
    lora_ext.inject_adapter(model, cfg, "ok")
    lora_ext.save_adapter(model, str(tmp_path / "good"), "ok")
    with pytest.raises(ValueError, match=f"lora_ext.save_adapter: invalid adapter name .*{rule}"):
        lora_ext.save_adapter(model, str(tmp_path / "out"), name)
    with pytest.raises(ValueError, match=f"lora_ext.load_adapter: invalid adapter name .*{rule}"):
        lora_ext.load_adapter(_model(), str(tmp_path / "good" / "ok"), adapter_name=name)
    assert not (tmp_path / "out").exists()


def test_absolute_name_cannot_write_outside(tmp_path):
    """The reported defect: the name "/abs/elsewhere" became the save folder itself."""
    target = tmp_path / "elsewhere"
    model = _model()
    with pytest.raises(ValueError):
        lora_ext.inject_adapter(model, LoraConfig(r=2, target_modules=["0"]), str(target))
    assert not target.exists()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_files_respect_the_umask(umask, tmp_path):
    model = lora_ext.inject_adapter(_model(), LoraConfig(r=2, target_modules=["0"]))
    old = os.umask(umask)
    try:
        out = lora_ext.save_adapter(model, str(tmp_path / "ad"))
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    want = stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
    assert want == 0o666 & ~umask
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) == want, name
    assert sorted(os.listdir(out)) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # no temporaries left


def _adapter(rank, seed):
    model = _model()
    lora_ext.inject_adapter(model, LoraConfig(r=rank, lora_alpha=3 * rank, target_modules=["0", "2"],
                                              init_lora_weights=False), "default")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + p.numel())))
    return model


def _save_forever(models, folder):
    """Child: overwrite the folder alternately with the two adapters until killed."""
    torch.set_num_threads(1)
    i = 0
    while True:
        lora_ext.save_adapter(models[i % 2], folder)
        i += 1


def _which(folder, models):
    """Load the folder; return 0/1 for the adapter it equals exactly (fails on a mix or an error)."""
    fresh = _model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora_ext.load_adapter(fresh, folder)
    mid_save = any("interrupted save" in str(w.message) for w in caught)
    got = lora_ext.io.adapter.adapter_state_dict(fresh)
    for k, m in enumerate(models):
        want = lora_ext.io.adapter.adapter_state_dict(m)
        cfg_equal = lora_ext.model.adapter_configs(fresh)["default"].to_dict() == \
            lora_ext.model.adapter_configs(m)["default"].to_dict()
        if cfg_equal and got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want):
            return k, mid_save
    raise AssertionError(f"{folder} holds neither adapter exactly")


def test_kill_9_during_overwrite_leaves_old_or_new(tmp_path):
    """kill -9 a process at 60 random moments while it overwrites an r=16 adapter with an r=8 one
    and back: the folder always loads as exactly one of the two, never a mix or an error."""
    models = [_adapter(16, 1), _adapter(8, 2)]
    folder = str(tmp_path / "ad")
    lora_ext.save_adapter(models[0], folder)
    ctx = mp.get_context("fork")  # the child shares the imported torch: a kill every few ms
    rng = random.Random(0)
    seen, mid = [0, 0], 0
    for _ in range(60):
        child = ctx.Process(target=_save_forever, args=(models, folder), daemon=True)
        child.start()
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        k, mid_save = _which(folder, models)
        seen[k] += 1
        mid += mid_save
    print(f"loaded old/new: {seen}, caught between the two renames: {mid}")
    leftovers = [n for n in os.listdir(folder) if n not in (CONFIG_NAME, WEIGHTS_NAME)]
    lora_ext.save_adapter(models[0], folder)  # the next save removes dead writers' temporaries
    assert sorted(os.listdir(folder)) == sorted([CONFIG_NAME, WEIGHTS_NAME]), leftovers
    assert _which(folder, models)[0] == 0


def test_weights_carry_their_config_and_peft_reads_the_folder(tmp_path):
    """A crash between the two renames leaves new weights next to the old config: the loader
    uses the weights' own config (with a warning); PEFT reads lora_ext folders unchanged."""
    import peft

    new, old = _adapter(8, 2), _adapter(16, 1)
    a, b = str(tmp_path / "new"), str(tmp_path / "old")
    lora_ext.save_adapter(new, a)
    lora_ext.save_adapter(old, b)
    os.replace(os.path.join(b, CONFIG_NAME), os.path.join(a, CONFIG_NAME))  # the crash state
    assert _which(a, [old, new]) == (1, True)  # the new adapter, and the loader warned
    c = lora_ext.save_adapter(new, str(tmp_path / "intact"))
    pm = peft.PeftModel.from_pretrained(_model(), c)
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), new(x), rtol=1e-4, atol=1e-4)
