"""examples/distributed_finetune.py's job (``finetune``) on a tiny Llama in 2 gloo ranks (issue 13).

The example itself runs SmolLM2-135M under ``torchrun`` (see the README); here the same function trains a
tiny ``LlamaForCausalLM`` (``models.tiny_llama``, untrained) under FSDP2 on windows that count up by one
(mod the vocabulary), which it learns in a few steps: the checks the example exits on must pass on both
ranks (one process loading the saved folder, with lora_ext and with PEFT, reproduces the sharded model's
gathered logits; the held-out perplexity drops), every rank must return rank 0's verdict, and a failed
check must show as failed on every rank.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_ext_dev import load_example
from lora_ext_dev.dist_harness import timed_world
from models import tiny_llama

distributed_finetune = load_example("distributed_finetune")

VOCAB, SEQ = 128, 16


def _counting_windows(n: int, seed: int) -> torch.Tensor:
    """``n`` windows ``s, s+1, s+2, ...`` (mod the vocabulary) from random starts."""
    starts = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (starts + torch.arange(SEQ)) % VOCAB


def _args(out: str, **overrides) -> object:
    flags = {
        "--out": out,
        "--steps": 8,
        "--rows": 4,
        "--lr": 3e-2,
        "--r": 4,
        "--alpha": 8,
        "--dropout": 0.0,
        "--check-windows": 3,
        "--min-drop": 0.05,
        **overrides,
    }
    return distributed_finetune.parse_args([str(x) for kv in flags.items() for x in kv if x is not None])


def _world(rank, world, tmp):
    data = {"train": _counting_windows(64, seed=1), "heldout": _counting_windows(8, seed=2)}
    passed = distributed_finetune.finetune(tiny_llama(), tiny_llama, data, _args(f"{tmp}/ok"))
    # FSDP2 keeping the gathered weights after each forward: the optimizer must still get the sharded ones
    kept = distributed_finetune.finetune(
        tiny_llama(), tiny_llama, data, _args(f"{tmp}/kept", **{"--no-reshard-after-forward": None})
    )
    # the same job with a perplexity drop it cannot reach: the check fails on every rank
    failed = distributed_finetune.finetune(
        tiny_llama(), tiny_llama, data, _args(f"{tmp}/fail", **{"--steps": 1, "--min-drop": 0.99})
    )
    files = sorted(p.name for p in Path(passed["adapter"]["path"]).iterdir())
    return passed, kept, failed, files


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return timed_world(_world, 2, tmp_path_factory, "distributed_example")


def test_example_checks_pass_on_the_sharded_tiny_llama(ranks):
    (r0, _, _, files), (r1, _, _, _) = ranks
    assert r0["world_size"] == 2 and r0["backend"] == "gloo"
    assert r0["model"]["fsdp_blocks"] == 2  # shard_lora_model's rule found model.layers.0 and .1
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    assert set(r0["adapter"]["files"]) == set(files) and r1["adapter"]["files"] == {}  # rank 0 wrote them
    assert len(r0["checks"]) == 3 and all(r0["checks"].values()), r0["checks"]
    for what, d in r0["single_process"].items():
        assert d["max_abs_diff"] < 1e-5, (what, d)  # fp32, the same weights: equal up to rounding
    assert r0["perplexity"]["adapter"] < 0.95 * r0["perplexity"]["base"]  # 132.2 -> 116.8 when written
    assert r0["loss_curve"][-1] < r0["loss_curve"][0]


def test_every_rank_returns_rank_0s_verdict(ranks):
    (r0, _, f0, _), (r1, _, f1, _) = ranks
    for key in ("checks", "single_process", "perplexity", "loss_curve"):
        assert r0[key] == r1[key], key
    assert f0["checks"] == f1["checks"]
    failed = [what for what, ok in f0["checks"].items() if not ok]
    assert failed == ["held-out perplexity >= 99% lower than the base's"]


def test_training_without_resharding_after_forward_ends_where_resharding_does(ranks):
    """``--no-reshard-after-forward``: after the base evaluation's forwards the model holds FSDP2's gathered
    copies; an optimizer given those would train nothing (found by running the example: the adapter stayed
    at its initial zero B, perplexity unchanged)."""
    (r0, k0, _, _), _ = ranks
    assert all(k0["checks"].values()), k0["checks"]
    assert k0["perplexity"]["adapter"] == pytest.approx(r0["perplexity"]["adapter"], rel=1e-5)
    assert k0["loss_curve"] == pytest.approx(r0["loss_curve"], rel=1e-5)
