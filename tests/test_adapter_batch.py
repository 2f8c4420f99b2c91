"""lora_ext.adapter_batch on a tiny Llama: per-row adapters against PEFT's adapter_names= path
and against running each row alone with its adapter; training several adapters at once;
the stack cache; bad input."""

import copy

import peft  # noqa: E402
import pytest
import torch

import lora_ext
from lora_ext import LoraConfig
from lora_ext.layers import per_row
from models import LLAMA_TARGETS, tiny_llama

pytestmark = pytest.mark.numerics  # scripts/isa_matrix.sh runs these under other instruction sets

BATCH, SEQ = 6, 5
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (6e-2, 5e-2), torch.float16: (1e-2, 1e-2)}


def _configs(n):
    """n adapters with different ranks, alphas, rsLoRA and target sets."""
    out = []
    for k in range(n):
        targets = LLAMA_TARGETS if k % 3 != 2 else ["q_proj", "v_proj", "down_proj"]
        out.append(
            dict(
                r=[4, 2, 8, 1, 3, 6, 5, 2][k],
                lora_alpha=[8, 3, 16, 1, 5, 12, 2, 7][k],
                use_rslora=k % 2 == 1,
                target_modules=targets,
                init_lora_weights=False,
            )
        )
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(base, PEFT model, lora_ext model) with 8 identical adapters a0..a7."""
    base = tiny_llama()
    pm = None
    for k, cfg in enumerate(_configs(8)):
        torch.manual_seed(100 + k)
        if pm is None:
            pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg), adapter_name="a0")
        else:
            pm.add_adapter(f"a{k}", peft.LoraConfig(**cfg))
    d = tmp_path_factory.mktemp("adapters")
    pm.save_pretrained(str(d), selected_adapters=[f"a{k}" for k in range(8)])
    ours = copy.deepcopy(base)
    for k in range(8):
        sub = d / f"a{k}"  # PEFT saves non-default adapters in subfolders
        lora_ext.load_adapter(ours, str(sub), adapter_name=f"a{k}")
    return base, pm.eval(), ours.eval()


def _names(n_adapters, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool = [f"a{k}" for k in range(n_adapters)] + ["__base__"]
    names = [pool[i] for i in torch.randint(0, len(pool), (BATCH,), generator=g)]
    names[0], names[-1] = "__base__", "a0"
    return names


def _ids(seed=1):
    return torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _row_by_row(model, ids, names):
    """The reference: each row alone, with its adapter active (or adapters disabled)."""
    rows = []
    for i, name in enumerate(names):
        with torch.no_grad():
            if name == "__base__":
                with lora_ext.disable_adapters(model):
                    rows.append(model(input_ids=ids[i : i + 1]).logits)
            else:
                lora_ext.set_adapter(model, name)
                rows.append(model(input_ids=ids[i : i + 1]).logits)
    return torch.cat(rows)


@pytest.mark.parametrize("n_adapters", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_peft_adapter_names_and_row_by_row(models, n_adapters, dtype):
    _, pm, ours = models
    pm, ours = copy.deepcopy(pm).to(dtype), copy.deepcopy(ours).to(dtype)
    ids, names = _ids(), _names(n_adapters)
    with torch.no_grad():
        want = pm(input_ids=ids, adapter_names=names).logits
        with lora_ext.adapter_batch(ours, names):
            got = ours(input_ids=ids).logits
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(got.float(), _row_by_row(ours, ids, names).float(), atol=atol, rtol=rtol)
    # the adapters do make the rows differ from the base model
    with torch.no_grad(), lora_ext.disable_adapters(ours):
        base = ours(input_ids=ids).logits
    for i, n in enumerate(names):
        assert (n == "__base__") == torch.allclose(got[i].float(), base[i].float(), atol=atol, rtol=rtol), n


def test_training_several_adapters_at_once_equals_each_on_its_rows(models):
    _, _, ours = models
    model = copy.deepcopy(ours).train()
    names = ["a0", "a2", "__base__", "a0", "a5", "a2"]
    used = sorted(set(names) - {"__base__"})
    for n in used:  # train exactly these adapters
        for _, layer in lora_ext.lora_layers(model):
            if layer.has_adapter(n):
                for t in layer.adapter_weights(n):
                    t.requires_grad_(True)
    ids = _ids()
    with lora_ext.adapter_batch(model, names):
        model(input_ids=ids).logits.square().mean(-1).sum().backward()
    got = {
        n: [t.grad.clone() for _, l in lora_ext.lora_layers(model) if l.has_adapter(n) for t in l.adapter_weights(n)]
        for n in used
    }
    for n in used:
        ref = copy.deepcopy(ours).train()
        lora_ext.set_adapter(ref, n)
        for _, layer in lora_ext.lora_layers(ref):
            if layer.has_adapter(n):
                for t in layer.adapter_weights(n):
                    t.requires_grad_(True)
        rows = [i for i, m in enumerate(names) if m == n]
        ref(input_ids=ids[rows]).logits.square().mean(-1).sum().backward()
        want = [t.grad for _, l in lora_ext.lora_layers(ref) if l.has_adapter(n) for t in l.adapter_weights(n)]
        assert len(got[n]) == len(want) > 0
        for a, b in zip(got[n], want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # an adapter with no rows in the batch gets a zero gradient
    for _, layer in lora_ext.lora_layers(model):
        if layer.has_adapter("a1"):
            assert all(t.grad is None or t.grad.abs().max() == 0 for t in layer.adapter_weights("a1"))


def test_stacks_are_cached_until_an_adapter_changes(models):
    _, _, ours = models
    model = copy.deepcopy(ours)
    ids, names = _ids(), _names(8)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    with torch.no_grad():
        with lora_ext.adapter_batch(model, names):
            y1 = model(input_ids=ids).logits
            stack = per_row.cached_stack(layer)[0]
            model(input_ids=ids)
            assert per_row.cached_stack(layer)[0] is stack  # not re-stacked
            a, b = layer.adapter_weights(names[-1])
            b.mul_(3.0)  # changed in place: the stack must follow
            y2 = model(input_ids=ids).logits
            assert per_row.cached_stack(layer)[0] is not stack
        assert not torch.allclose(y1[-1], y2[-1])
        lora_ext.set_adapter(model, names[-1])
        torch.testing.assert_close(y2[-1:], model(input_ids=ids[-1:]).logits, atol=2e-5, rtol=2e-5)
    # outside the context the layers are back to their active adapter
    assert all(lora_ext.layers.per_row.current_batch(l) is None for _, l in lora_ext.lora_layers(model))


def test_single_layer_and_3d_rows():
    torch.manual_seed(0)
    layer = lora_ext.LoraLinear(torch.nn.Linear(16, 12), r=4, init_lora_weights=False)
    layer.add_adapter("b", r=2, lora_alpha=5, init_lora_weights=False)
    x = torch.randn(3, 7, 16)
    with torch.no_grad(), lora_ext.adapter_batch(layer, ["b", "__base__", "default"]):
        y = layer(x)
    with torch.no_grad():
        layer.set_adapter("b")
        torch.testing.assert_close(y[0], layer(x[0]), atol=1e-5, rtol=1e-5)
        layer.set_adapter("default")
        torch.testing.assert_close(y[2], layer(x[2]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y[1], layer.base_layer(x[1]), atol=1e-5, rtol=1e-5)


def test_bad_use_raises_clear_errors(models):
    _, _, ours = models
    model = copy.deepcopy(ours)
    ids = _ids()
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        with lora_ext.adapter_batch(model, ["a0", "nope"] + ["a1"] * 4):
            pass
    with pytest.raises(TypeError, match="list of adapter names"):
        with lora_ext.adapter_batch(model, "a0"):
            pass
    with pytest.raises(ValueError, match="batch of 3 rows"):
        with lora_ext.adapter_batch(model, ["a0", "a1", "a2"]), torch.no_grad():
            model(input_ids=ids)
    lora_ext.set_adapter(model, "a0")
    lora_ext.merge(model)
    with pytest.raises(ValueError, match="merged adapters; unmerge"):
        with lora_ext.adapter_batch(model, ["a0"] * BATCH):
            pass
    lora_ext.unmerge(model)
    # different dropout among the batch's adapters in training
    layer = lora_ext.LoraLinear(torch.nn.Linear(8, 8), r=2, lora_dropout=0.1)
    layer.add_adapter("other", r=2, lora_dropout=0.2)
    with pytest.raises(ValueError, match="different lora_dropout"):
        with lora_ext.adapter_batch(layer, ["default", "other"]):
            layer.train()(torch.randn(2, 8))
    # embedding adapters are not per-row yet: refused up front
    emb = copy.deepcopy(tiny_llama())
    lora_ext.inject_adapter(emb, LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]), "e")
    with pytest.raises(NotImplementedError, match="model.embed_tokens"):
        with lora_ext.adapter_batch(emb, ["e"] * BATCH):
            pass


def test_more_bad_use_raises_clear_errors():
    """adapter_batch misuse on small layers: modules_to_save adapters, non-str names, an input
    without a batch dim, and a merge inside the batch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    lora_ext.inject_adapter(model, LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"]), "a")
    with pytest.raises(
        NotImplementedError,
        match=r"adapter_batch: per-row adapters are implemented for linear "
        r"layers; \['2'\] hold adapters of this batch",
    ):
        with lora_ext.adapter_batch(model, ["a", "a"]):
            pass
    layer = lora_ext.LoraLinear(torch.nn.Linear(8, 4), r=2)
    with pytest.raises(
        TypeError,
        match=r"adapter_batch: expected a list of adapter names \(one per batch row\), "
        r"got \[0, 1\]",
    ):
        with lora_ext.adapter_batch(layer, [0, 1]):
            pass
    with pytest.raises(
        ValueError,
        match=r"adapter_batch \(LoraLinear\): expected an input whose first dim is the "
        r"batch of 1 rows .* got x of shape \(8,\)",
    ):
        with lora_ext.adapter_batch(layer, ["default"]):
            layer(torch.randn(8))
    with pytest.raises(
        ValueError,
        match=r"adapter_batch \(LoraLinear\): adapters are merged into the weight; "
        r"unmerge\(\) before per-row adapters",
    ):
        with lora_ext.adapter_batch(layer, ["default", "default"]):
            layer.merge()
            layer(torch.randn(2, 8))
