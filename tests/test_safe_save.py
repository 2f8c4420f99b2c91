"""Saving adapters safely: names never escape the folder, files get the umask's permissions,
and a crash (kill -9) at any moment of an overwrite leaves exactly the old or the new adapter. The
same guarantees for the C++ writers (lora_ext::write_safetensors and the crash-safe file primitive
under it, csrc/io/atomic_file.h), which write the same two files through lora_ext._C."""

import json
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
from lora_ext.io.adapter import CONFIG_METADATA_KEY, CONFIG_NAME, WEIGHTS_NAME

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


def save_with_cpp(model, folder):
    """An adapter folder written by the C++ writers, as save_adapter writes it: the weights first, carrying
    their config in their metadata, then adapter_config.json."""
    cfg = json.dumps(lora_ext.model.adapter_configs(model)["default"].to_dict(), indent=2, sort_keys=True)
    os.makedirs(folder, exist_ok=True)
    lora_ext._C.write_safetensors(
        os.path.join(folder, WEIGHTS_NAME),
        lora_ext.io.adapter.adapter_state_dict(model),
        {"format": "pt", CONFIG_METADATA_KEY: cfg},
    )
    lora_ext._C.write_file_atomic(os.path.join(folder, CONFIG_NAME), cfg.encode())
    return folder


WRITERS = ["python", "c++"]


def _save(writer, model, folder):
    return lora_ext.save_adapter(model, folder) if writer == "python" else save_with_cpp(model, folder)


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_files_respect_the_umask(umask, writer, tmp_path):
    model = lora_ext.inject_adapter(_model(), LoraConfig(r=2, target_modules=["0"]))
    old = os.umask(umask)
    try:
        out = _save(writer, model, str(tmp_path / "ad"))
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
    lora_ext.inject_adapter(
        model, LoraConfig(r=rank, lora_alpha=3 * rank, target_modules=["0", "2"], init_lora_weights=False), "default"
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + p.numel())))
    return model


def _save_forever(writer, models, folder):
    """Child: overwrite the folder alternately with the two adapters until killed."""
    torch.set_num_threads(1)
    i = 0
    while True:
        _save(writer, models[i % 2], folder)
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
        cfg_equal = (
            lora_ext.model.adapter_configs(fresh)["default"].to_dict()
            == lora_ext.model.adapter_configs(m)["default"].to_dict()
        )
        if cfg_equal and got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want):
            return k, mid_save
    raise AssertionError(f"{folder} holds neither adapter exactly")


@pytest.mark.parametrize("writer", WRITERS)
def test_kill_9_during_overwrite_leaves_old_or_new(writer, tmp_path):
    """kill -9 a process at 60 random moments while it overwrites an r=16 adapter with an r=8 one
    and back (with the Python or the C++ writers): the folder always loads as exactly one of the two,
    never a mix or an error."""
    models = [_adapter(16, 1), _adapter(8, 2)]
    folder = str(tmp_path / "ad")
    _save(writer, models[0], folder)
    ctx = mp.get_context("fork")  # the child shares the imported torch: a kill every few ms
    rng = random.Random(0)
    seen, mid = [0, 0], 0
    for _ in range(60):
        child = ctx.Process(target=_save_forever, args=(writer, models, folder), daemon=True)
        child.start()
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        k, mid_save = _which(folder, models)
        seen[k] += 1
        mid += mid_save
    print(f"loaded old/new: {seen}, caught between the two renames: {mid}")
    leftovers = [n for n in os.listdir(folder) if n not in (CONFIG_NAME, WEIGHTS_NAME)]
    _save(writer, models[0], folder)  # the next save removes dead writers' temporaries
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


# ---- the C++ writers' file primitive (csrc/io/atomic_file.h) ---------------------------------------------

TMP_MARK = ".lora_ext-tmp-"  # both languages' temporaries: .<name>.lora_ext-tmp-<pid>-<random>


def _write_many(path, tensors, times):
    torch.set_num_threads(1)
    for _ in range(times):
        lora_ext._C.write_safetensors(path, tensors)


def _is_one_of(got, versions):
    return any(got.keys() == v.keys() and all(torch.equal(got[n], v[n]) for n in v) for v in versions)


@pytest.mark.parametrize("how", ["threads", "processes"])
def test_concurrent_cpp_saves_of_one_file_never_mix(how, tmp_path):
    """Two writers overwrite one file 40 times each with the C++ writer (threads: it releases the GIL;
    processes: each one's cleanup of dead writers' temporaries must spare the other's) while it is read:
    no write fails and every read gets exactly one of the two versions. (With one fixed temporary name
    the writers truncated and renamed each other's temporary: mixed bytes, and a failed rename.)"""
    import concurrent.futures as cf

    path = str(tmp_path / "x.safetensors")
    versions = [{"w": torch.full((128, 1024), float(k)), f"only{k}": torch.arange(k + 3.0)} for k in range(2)]
    lora_ext._C.write_safetensors(path, versions[0])
    if how == "threads":
        pool = cf.ThreadPoolExecutor(2)
        jobs = [pool.submit(_write_many, path, v, 40) for v in versions]
        done = lambda: all(j.done() for j in jobs)  # noqa: E731
    else:
        jobs = [mp.get_context("fork").Process(target=_write_many, args=(path, v, 40)) for v in versions]
        for j in jobs:
            j.start()
        done = lambda: not any(j.is_alive() for j in jobs)  # noqa: E731
    reads = 0
    while not done() or reads == 0:
        assert _is_one_of(lora_ext._C.read_safetensors(path), versions)
        reads += 1
    if how == "threads":
        for j in jobs:
            j.result()  # raises what a writer raised
        pool.shutdown()
    else:
        for j in jobs:
            j.join()
        assert [j.exitcode for j in jobs] == [0, 0]
    assert _is_one_of(lora_ext._C.read_safetensors(path), versions)
    assert os.listdir(tmp_path) == ["x.safetensors"]  # no temporaries left


def test_each_language_removes_the_others_dead_temporaries(tmp_path):
    """Temporaries of writers that died are removed by the next write in the folder,
    whichever language left them; a running writer's (this process) and files that are not temporaries are kept."""
    dead = mp.get_context("fork").Process(target=int)
    dead.start()
    dead.join()
    live = f".a{TMP_MARK}{os.getpid()}-0123"
    others = ["notes.tmp", f".b{TMP_MARK}x-1", live]
    for name in others:
        (tmp_path / name).write_bytes(b"keep")
    for clean in (
        lambda: lora_ext._C.write_safetensors(str(tmp_path / "c.safetensors"), {"x": torch.ones(1)}),
        lambda: lora_ext._C.write_file_atomic(str(tmp_path / "c.json"), b"{}"),
        lambda: lora_ext.io.adapter.remove_stale_temporaries(str(tmp_path)),
    ):
        stale = tmp_path / f".c.safetensors{TMP_MARK}{dead.pid}-89ab"
        stale.write_bytes(b"half a file")
        clean()
        assert not stale.exists()
        assert all((tmp_path / n).read_bytes() == b"keep" for n in others)


def _write_past_file_size_limit(path, conn):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead of killing the process
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        lora_ext._C.write_safetensors(path, {"big": torch.zeros(10_000)})
        conn.send("no error")
    except RuntimeError as e:
        conn.send(str(e))


def test_cpp_writer_failures_keep_the_old_file_and_leave_no_temporary(tmp_path):
    """A write that fails halfway (file size limit: as a full disk) and a rename that fails (the target is a
    folder) raise naming the step and the system's reason; the old file is kept, no temporary is left."""
    path = str(tmp_path / "keep.safetensors")
    lora_ext._C.write_safetensors(path, {"old": torch.arange(3.0)})
    parent, child = mp.get_context("fork").Pipe()
    p = mp.get_context("fork").Process(target=_write_past_file_size_limit, args=(path, child))
    p.start()
    msg = parent.recv()
    p.join()
    assert msg.startswith(f"lora_ext::write_safetensors: {path}: writing ") and msg.endswith("failed: File too large")
    assert torch.equal(lora_ext._C.read_safetensors(path)["old"], torch.arange(3.0))
    (tmp_path / "folder").mkdir()
    with pytest.raises(
        RuntimeError,
        match=r"lora_ext::write_safetensors: .*folder: could not rename .* "
        r"to the target: Is a directory",
    ):
        lora_ext._C.write_safetensors(str(tmp_path / "folder"), {"x": torch.ones(1)})
    assert sorted(os.listdir(tmp_path)) == ["folder", "keep.safetensors"]
