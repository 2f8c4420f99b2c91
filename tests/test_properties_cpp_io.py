"""Property-based tests (Hypothesis) of the C++ adapter readers through lora_ext._C, on the mutated adapter
folders of adapter_mutations.py: read_safetensors returns what the safetensors library reads or raises a
``lora_ext::`` RuntimeError/ValueError; load_adapter_config likewise; lora_ext::merge_adapter (TorchScript
test hook) either merges exactly W + scale * dW with the file's tensors or throws and writes nothing."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import lora_ext
from adapter_mutations import CONFIG, MUTATIONS, PREFIX, WEIGHTS, _note, effective_config_folder, mutated_copy, scenario
from lora_ext import LoraConfig
from lora_ext.model.targeting import layer_r_alpha
from strategies import bits, examples

CPP_ERRORS = (RuntimeError, ValueError)  # c10::Error and c10::ValueError through lora_ext._C


# Known bugs of the C++ readers (csrc/io; reported, not fixed here), each with a reproduction on ``net``.
KNOWN_CPP_BUGS: dict = {}  # none open; a new one gets a row {name: (mutations, reason)}
# C++ reader bugs these properties found, fixed since; replayed strictly, also as PEFT-style folders.
FIXED_CPP_BUGS = {
    "cpp-rank-not-checked": [("metadata", {}), ("set", "r", 3)],
    "cpp-lenient-safetensors": [("append", WEIGHTS, b"\0")],
    "cpp-non-utf8-names": [("name_byte", 0, 0xE2)],
    "cpp-regex-error-unprefixed": [("metadata", {}), ("set", "rank_pattern", {"(": 2})],
    "cpp-reshape-error-unprefixed": [("reshape", 1, "add_dim")],
    "cpp-non-utf8-error-message": [("append", CONFIG, b"\xff")],
}
# where an error without the lora_ext:: prefix comes from (its message) -> the known bug
UNPREFIXED = {
    "regular expression": "cpp-regex-error-unprefixed",
    "is invalid for input of size": "cpp-reshape-error-unprefixed",
    "cannot reshape tensor": "cpp-reshape-error-unprefixed",
    "codec can't decode": "cpp-non-utf8-error-message",
}


class KnownBug(Exception):
    pass


def expect(ok, bug, msg, allow_known):
    if not ok:
        if allow_known and bug in KNOWN_CPP_BUGS:
            raise KnownBug(bug)
        raise AssertionError(f"{msg} [{bug}]")


def _cpp_error(e, allow_known):
    bug = next((b for text, b in UNPREFIXED.items() if text in str(e)), "cpp-unclear-error")
    expect(str(e).startswith("lora_ext::"), bug, f"C++ error without the lora_ext:: prefix: {e}", allow_known)


def _delta(key, tensors):
    """(module path, rank, dW, |B| @ |A|) without the scale for a lora_A key of the file, else None."""
    name = key[len(PREFIX) :]
    for a_suffix, b_suffix, transpose in (
        (".lora_A.weight", ".lora_B.weight", False),
        (".lora_embedding_A", ".lora_embedding_B", True),
    ):
        if name.endswith(a_suffix):
            path = name[: -len(a_suffix)]
            a, b = tensors[key].double(), tensors[PREFIX + path + b_suffix].double()
            d, bound = b @ a, b.abs() @ a.abs()
            return path, a.shape[0], (d.T, bound.T) if transpose else (d, bound)
    return None


def check_cpp(sc, folder, allow_known=True):
    """The C++ readers on a folder: the same tensors as the safetensors library or a clear error; a merge
    equal to W + scale * dW with the file's tensors, or an error and no output file."""
    st_path = os.path.join(folder, WEIGHTS)
    try:
        want = load_file(st_path)
    except Exception as e:  # noqa: BLE001  (the library's own error types)
        want = e
    try:
        got = lora_ext._C.read_safetensors(st_path)
    except UnicodeDecodeError as e:
        expect(False, "cpp-non-utf8-names", f"tensor names that are not UTF-8: {e}", allow_known)
    except CPP_ERRORS as e:
        _cpp_error(e, allow_known)
        got = e
    _note(f"safetensors: {want!r:.200}; C++: {got!r:.200}")
    if isinstance(got, dict):
        expect(
            isinstance(want, dict),
            "cpp-lenient-safetensors",
            f"C++ reads a file safetensors refuses: {want}",
            allow_known,
        )
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(bits(got[k]), bits(want[k])), k
    try:
        lora_ext._C.load_adapter_config(folder)
    except CPP_ERRORS as e:
        _cpp_error(e, allow_known)
    out = os.path.join(folder, "merged.pt")
    try:
        lora_ext._C.merge_adapter_into_script_file(sc.script, folder, out)
    except CPP_ERRORS as e:
        _cpp_error(e, allow_known)
        assert not os.path.exists(out), "a failed C++ merge wrote its output"
        return
    cfg_folder = effective_config_folder(folder)
    try:  # the config as Python reads it, for the rank each module must have
        config = LoraConfig.from_dict(json.load(open(os.path.join(cfg_folder, CONFIG))))
    except Exception:  # noqa: BLE001  (not a config Python reads; the rank is not checked then)
        config = None
    merged = torch.jit.load(out).state_dict()
    base = {k: v.double() for k, v in torch.jit.load(sc.script).state_dict().items()}
    for key in got:
        d = _delta(key, got)
        if d is None:
            continue
        path, r, (delta, bound) = d
        if config is not None:
            want_r = layer_r_alpha(config, path)[0]
            expect(
                r == want_r, "cpp-rank-not-checked", f"merged {path} of rank {r}; the config says {want_r}", allow_known
            )
        scale, w0 = lora_ext._C.adapter_scaling(cfg_folder, path), base[path + ".weight"]
        got_w, want_w = merged[path + ".weight"].double(), w0 + scale * delta
        tol = 1e-6 * (r * abs(scale) * bound + w0.abs()) + 1e-30  # float32 accumulation and rounding
        big = want_w.abs() > 0.999 * torch.finfo(torch.float32).max
        overflow = big & (got_w == want_w.sign() * float("inf"))  # float32's inf
        ok = ((got_w - want_w).abs() <= tol) | overflow
        assert ok.all() or not torch.isfinite(scale * bound).all(), f"merged {path}: {got_w[~ok]} != {want_w[~ok]}"


@settings(max_examples=examples(100))
@given(mutations=st.lists(MUTATIONS, min_size=1, max_size=3))
def test_cpp_readers_agree_with_python_libraries_or_raise(mutations):
    try:
        check_cpp(scenario("net"), mutated_copy(scenario("net"), mutations))
    except KnownBug as e:
        _note(f"known C++ bug {e}", as_event=True)


@pytest.mark.parametrize("bug", sorted(FIXED_CPP_BUGS))
def test_fixed_cpp_reader_bug_stays_fixed(bug):
    check_cpp(scenario("net"), mutated_copy(scenario("net"), FIXED_CPP_BUGS[bug]), allow_known=False)


if KNOWN_CPP_BUGS:

    @pytest.mark.parametrize(
        "bug",
        [
            pytest.param(b, marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=row[1]))
            for b, row in KNOWN_CPP_BUGS.items()
        ],
    )
    def test_known_cpp_reader_bug(bug):
        check_cpp(scenario("net"), mutated_copy(scenario("net"), KNOWN_CPP_BUGS[bug][0]), allow_known=False)
