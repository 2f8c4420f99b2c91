"""Activation checkpointing with LoRA dropout is exact: the recomputed forward draws its dropout seed
from the RNG state that torch.utils.checkpoint restores, so it regenerates the same masks and every
gradient equals the non-checkpointed one bit for bit. Checked on a real decoder block (tiny LLaMA,
LoRA on its 7 projections) with reentrant and non-reentrant checkpointing, with one adapter and with
per-row adapters (lora_ext.adapter_batch), and on the whole model through transformers' own
checkpointing. The recomputation of a per-row forward must see the same adapter_batch: inside the
``with`` it does (on any thread); after it, the recomputation is refused instead of running the
model's active adapters."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import lora_ext
from models import LLAMA_TARGETS, llama_inputs, tiny_llama

pytestmark = pytest.mark.numerics  # scripts/isa_matrix.sh runs these under other instruction sets

ROWS = ["a", lora_ext.BASE, "b"]  # per-row adapters of a 3-row batch


def lora_llama(adapters=("a",), dropout: float = 0.3):
    """tiny_llama with LoRA r=4 (random A and B) on the 7 projections of every block, in training mode;
    with two adapters both are active and trainable."""
    model = tiny_llama()
    for name in adapters:
        cfg = lora_ext.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False, target_modules=LLAMA_TARGETS
        )
        lora_ext.inject_adapter(model, cfg, name)
    lora_ext.set_adapter(model, list(adapters))
    return model.train()


def adapter_params(model) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert params and all(p.requires_grad for p in params.values())
    return params


class Block:
    """The first decoder block of a LoRA tiny LLaMA and a fixed input (hidden states + rotary embeddings)."""

    def __init__(self, adapters=("a",), dropout: float = 0.3):
        self.model = lora_llama(adapters, dropout)
        self.block = self.model.model.layers[0]
        self.params = {n: p for n, p in adapter_params(self.model).items() if n.startswith("model.layers.0.")}
        assert len(self.params) == 2 * len(LLAMA_TARGETS) * len(adapters)
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(len(ROWS), 6, 32, generator=g)
        positions = torch.arange(6)[None].expand(len(ROWS), 6)
        self.pe = self.model.model.rotary_emb(self.x, positions)
        self.w = torch.randn(len(ROWS), 6, 32, generator=g)  # a loss that weights every output element
        self.calls = 0  # forwards of q_proj: a recomputation runs it again
        self.block.self_attn.q_proj.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))

    def run(
        self,
        seed: int,
        use_reentrant=None,
        rows=None,
        backward_inside: bool = True,
        thread: bool = False,
        preserve_rng_state: bool = True,
    ) -> dict[str, torch.Tensor]:
        """One forward + backward from ``torch.manual_seed(seed)``: plain (``use_reentrant=None``) or under
        ``checkpoint``; ``rows``: inside ``adapter_batch(model, rows)``, backward inside or after the
        ``with``, on this thread or another one. Returns the gradients of the input and of every adapter."""
        for p in self.params.values():
            p.grad = None
        x = self.x.clone().requires_grad_(True)

        def f(h):
            return self.block(h, position_embeddings=self.pe)

        torch.manual_seed(seed)
        batch = lora_ext.adapter_batch(self.model, rows) if rows else contextlib.nullcontext()
        with batch:
            y = (
                f(x)
                if use_reentrant is None
                else checkpoint(f, x, use_reentrant=use_reentrant, preserve_rng_state=preserve_rng_state)
            )
            loss = (y * self.w).sum()
            if backward_inside:
                backward(loss, thread)
        if not backward_inside:
            backward(loss, thread)
        return {"input": x.grad, **{n: p.grad for n, p in self.params.items()}}


def backward(loss: torch.Tensor, thread: bool) -> None:
    if not thread:
        loss.backward()
        return
    errors = []

    def run():
        try:
            loss.backward()
        except BaseException as e:  # re-raised on the calling thread
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if errors:
        raise errors[0]


def assert_bitwise_equal(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] is not None and want[name] is not None, f"{what}: no gradient for {name}"
        assert torch.equal(got[name], want[name]), (
            f"{what}: gradient of {name} differs from the non-checkpointed run by up to "
            f"{(got[name] - want[name]).abs().max().item():.3g}"
        )


def differing(a: dict, b: dict) -> list[str]:
    return [n for n in a if not torch.equal(a[n], b[n])]


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_block_checkpoint_regenerates_the_dropout_masks(use_reentrant):
    blk = Block()
    plain = blk.run(seed=11)
    assert blk.calls == 1
    got = blk.run(seed=11, use_reentrant=use_reentrant)
    assert blk.calls == 3, (
        f"expected the checkpointed block to run q_proj twice (forward + recompute), got {blk.calls - 1}"
    )
    assert_bitwise_equal(got, plain, f"checkpoint(use_reentrant={use_reentrant})")


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_other_masks_give_other_gradients(use_reentrant):
    """The bitwise checks above are not vacuous: dropout is active in every LoRA layer of the block, so
    another seed (no reset of the RNG) gives other masks and other gradients, and a recomputation that
    does not restore the RNG (preserve_rng_state=False) draws other masks than its forward and gets
    gradients that differ from the non-checkpointed run."""
    blk = Block()
    plain = blk.run(seed=11)
    other_seed = blk.run(seed=12)
    assert differing(other_seed, plain) == list(plain), "another seed should change every gradient"
    fresh_masks = blk.run(seed=11, use_reentrant=use_reentrant, preserve_rng_state=False)
    changed = differing(fresh_masks, plain)
    assert "input" in changed and len(changed) > len(plain) // 2, (
        f"checkpoint(preserve_rng_state=False): expected gradients that differ from the plain run (masks drawn "
        f"again), got only {changed} differing"
    )
    without_dropout = Block()
    for _, layer in lora_ext.lora_layers(without_dropout.model):
        layer.lora_dropout["a"] = 0.0
    # the same check passes without dropout: the difference above comes from the masks alone
    assert_bitwise_equal(
        without_dropout.run(seed=11, use_reentrant=use_reentrant, preserve_rng_state=False),
        without_dropout.run(seed=12),
        "no dropout",
    )


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("thread", [False, True], ids=["same thread", "backward on another thread"])
def test_block_checkpoint_per_row_adapters(use_reentrant, thread):
    """Per-row adapters, backward inside the ``with``: the recomputation serves the same rows with the same
    adapters and masks, also when backward runs on another thread (as the autograd engine's device
    threads do), where the adapter_batch's context is not current."""
    blk = Block(adapters=("a", "b"))
    plain = blk.run(seed=5, rows=ROWS)
    got = blk.run(seed=5, use_reentrant=use_reentrant, rows=ROWS, thread=thread)
    assert_bitwise_equal(got, plain, f"adapter_batch + checkpoint(use_reentrant={use_reentrant})")
    # not vacuous: without the batch the block runs both adapters on every row, with other gradients
    assert differing(blk.run(seed=5), plain) == list(plain)
    assert all(g.abs().sum() > 0 for g in plain.values())


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_per_row_recompute_after_the_with_is_refused(use_reentrant):
    """Backward after the ``with`` (the main job's pattern) is fine without checkpointing; with it, the
    recomputation would run the model's active adapters on every row (reentrant: silently wrong
    gradients; non-reentrant: torch's metadata check fails). It is refused with a clear error; plain
    checkpointing of the same model afterwards is not affected."""
    blk = Block(adapters=("a", "b"))
    inside = blk.run(seed=5, rows=ROWS)
    assert_bitwise_equal(blk.run(seed=5, rows=ROWS, backward_inside=False), inside, "backward after the with")
    with pytest.raises(
        RuntimeError,
        match=r"adapter_batch \(LoraLinear\): activation checkpointing recomputes "
        r"this layer's forward during backward, and the adapter_batch it ran "
        r"under has been exited; expected backward\(\) inside that",
    ):
        blk.run(seed=5, use_reentrant=use_reentrant, rows=ROWS, backward_inside=False)
    assert_bitwise_equal(blk.run(seed=7, use_reentrant=use_reentrant), blk.run(seed=7), "plain after per-row")


def model_grads(model, ids, rows=None) -> dict[str, torch.Tensor]:
    torch.manual_seed(21)
    with lora_ext.adapter_batch(model, rows) if rows else contextlib.nullcontext():
        model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in adapter_params(model).items()}


def enable_checkpointing(model, use_reentrant: bool) -> None:
    """transformers' per-block checkpointing (``activation_checkpointing_enable``, formerly
    ``gradient_checkpointing_enable``, which now warns that it is deprecated)."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("rows", [None, ROWS], ids=["active adapter", "per-row adapters"])
def test_model_gradient_checkpointing_is_exact(use_reentrant, rows):
    adapters = ("a", "b") if rows else ("a",)
    ids = llama_inputs(batch=len(ROWS), seq=9)
    want = model_grads(lora_llama(adapters), ids, rows)
    model = lora_llama(adapters)
    enable_checkpointing(model, use_reentrant)
    calls = []
    model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda *_: calls.append(1))
    got = model_grads(model, ids, rows)
    assert len(calls) == 2, f"expected down_proj of the last block to run twice (forward + recompute), got {len(calls)}"
    assert_bitwise_equal(got, want, f"gradient checkpointing (use_reentrant={use_reentrant})")


def _grads_of(blk: Block, rows, use_reentrant: bool, after_forward=None) -> torch.Tensor:
    """One checkpointed forward + backward of ``blk`` under ``adapter_batch(rows)``; returns the input's gradient
    (the adapters' gradients accumulate in their ``.grad``, shared by the threads); ``after_forward`` runs
    between forward and backward."""
    x = blk.x.clone().requires_grad_(True)
    with lora_ext.adapter_batch(blk.model, rows):
        y = checkpoint(lambda h: blk.block(h, position_embeddings=blk.pe), x, use_reentrant=use_reentrant)
        loss = (y * blk.w).sum()
        if after_forward:
            after_forward()
        loss.backward()
    return x.grad


def _param_grads(blk: Block) -> dict[str, torch.Tensor]:
    out = {n: p.grad for n, p in blk.params.items()}
    for p in blk.params.values():
        p.grad = None
    return out


def _in_threads(*fns):
    results, errors = [None] * len(fns), []

    def run(i):
        try:
            results[i] = fns[i]()
        except BaseException as e:  # re-raised on the calling thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results, errors


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_two_threads_train_per_row_batches_through_one_model(use_reentrant):
    """Two threads train different per-row batches through one model with activation checkpointing, their
    forwards and backwards interleaved (each forward runs before the other thread's backward): each thread's
    input gradient equals its own run alone, bit for bit, and the adapters' accumulated gradients are the sum
    of the two runs alone. (No dropout: the threads share torch's global generator.)"""
    blk = Block(adapters=("a", "b"), dropout=0.0)
    rows_1, rows_2 = ROWS, ["b", "a", "b"]
    alone_1 = _grads_of(blk, rows_1, use_reentrant), _param_grads(blk)
    alone_2 = _grads_of(blk, rows_2, use_reentrant), _param_grads(blk)
    assert not torch.equal(alone_1[0], alone_2[0])  # two different batches
    barrier = threading.Barrier(2, timeout=60)
    (x_1, x_2), errors = _in_threads(
        lambda: _grads_of(blk, rows_1, use_reentrant, after_forward=barrier.wait),
        lambda: _grads_of(blk, rows_2, use_reentrant, after_forward=barrier.wait),
    )
    assert not errors, errors
    assert torch.equal(x_1, alone_1[0]) and torch.equal(x_2, alone_2[0])
    both = _param_grads(blk)
    for name, g in both.items():
        assert torch.equal(g, alone_1[1][name] + alone_2[1][name]), name


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_another_threads_open_batch_does_not_stand_in_for_an_exited_one(use_reentrant):
    """Thread 1 recomputes after its ``with`` (refused), while thread 2 still trains a per-row batch through the
    same layers: thread 2's batch must not be used for thread 1's rows (which a record on the shared layer
    did: silently wrong gradients)."""
    blk = Block(adapters=("a", "b"), dropout=0.0)
    second_forward_done, first_may_finish = threading.Event(), threading.Event()

    def first():
        x = blk.x.clone().requires_grad_(True)
        with lora_ext.adapter_batch(blk.model, ROWS):
            y = checkpoint(lambda h: blk.block(h, position_embeddings=blk.pe), x, use_reentrant=use_reentrant)
            loss = (y * blk.w).sum()
        assert second_forward_done.wait(60)
        try:
            loss.backward()
        finally:
            first_may_finish.set()

    def second():
        def hold():
            second_forward_done.set()
            assert first_may_finish.wait(60)

        return _grads_of(blk, ["b", "b", "a"], use_reentrant, after_forward=hold)

    (_, x_2), errors = _in_threads(first, second)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError), errors
    assert "the adapter_batch it ran under has been exited" in str(errors[0])
    _param_grads(blk)
    assert x_2 is not None and torch.equal(x_2, _grads_of(blk, ["b", "b", "a"], use_reentrant))
