"""adapter_batch is request state: many threads and asyncio tasks serving different adapter
mixes through ONE model get exactly what each request gets when run alone.

(Regression: the per-row batch used to live on the shared layer modules, and 4 threads
serving adapters "a"/"b" got 534 of 1200 outputs computed with another request's adapters.)
"""

import asyncio
import sys
import threading

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import LoraConfig

pytestmark = pytest.mark.numerics  # scripts/isa_matrix.sh runs these under other instruction sets

ADAPTERS = {"a": 4, "b": 2, "c": 8, "d": 1}
ROWS, SEQ, DIM = 3, 2, 24


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh(), nn.Linear(DIM, DIM), nn.Tanh(), nn.Linear(DIM, DIM))
    for name, r in ADAPTERS.items():
        lora_ext.inject_adapter(
            model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0", "2", "4"], init_lora_weights=False), name
        )
    return model.eval()


def _requests(n: int, seed: int):
    """n requests: (adapter names, one per row; input [ROWS, SEQ, DIM])."""
    g = torch.Generator().manual_seed(seed)
    pool = list(ADAPTERS) + [lora_ext.BASE]
    out = []
    for _ in range(n):
        names = [pool[i] for i in torch.randint(0, len(pool), (ROWS,), generator=g)]
        out.append((names, torch.randn(ROWS, SEQ, DIM, generator=g)))
    return out


def _serve(model, names, x):
    with lora_ext.adapter_batch(model, names):
        return model(x)


def _alone(model, requests):
    """The reference: every request on its own, one after another."""
    with torch.no_grad():
        return [_serve(model, names, x) for names, x in requests]


def _count_wrong(got, want) -> int:
    return sum(not torch.allclose(g, w, rtol=1e-5, atol=1e-6) for g, w in zip(got, want))


@pytest.fixture
def fast_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(2e-5)  # switch threads very often: races show up at once
    yield
    sys.setswitchinterval(old)


def test_threads_get_their_own_adapters(fast_switching):
    model = _model()
    n_threads, per_thread = 8, 500
    work = [_requests(per_thread, seed=t) for t in range(n_threads)]
    want = [_alone(model, reqs) for reqs in work]
    got: list = [None] * n_threads
    errors = []
    start = threading.Barrier(n_threads)

    def run(t):
        try:
            start.wait()
            with torch.no_grad():
                got[t] = [_serve(model, names, x) for names, x in work[t]]
        except BaseException as e:  # re-raised below with the thread's index
            errors.append((t, e))

    threads = [threading.Thread(target=run, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    wrong = sum(_count_wrong(got[t], want[t]) for t in range(n_threads))
    assert wrong == 0, f"{wrong} of {n_threads * per_thread} outputs used another request's adapters"


def test_asyncio_tasks_interleaving_inside_adapter_batch():
    model = _model()
    n_tasks, per_task = 8, 20
    work = [_requests(per_task, seed=100 + t) for t in range(n_tasks)]
    want = [_alone(model, reqs) for reqs in work]

    async def task(t):
        outs = []
        for names, x in work[t]:
            with lora_ext.adapter_batch(model, names):
                await asyncio.sleep(0)  # every other task enters its own batch here
                with torch.no_grad():
                    y = model(x)
                await asyncio.sleep(0)
                with torch.no_grad():
                    y2 = model(x)  # still this task's batch after the others ran
            outs.append(y)
            assert torch.equal(y, y2)
        return outs

    async def main():
        return await asyncio.gather(*(task(t) for t in range(n_tasks)))

    got = asyncio.run(main())
    wrong = sum(_count_wrong(got[t], want[t]) for t in range(n_tasks))
    assert wrong == 0, f"{wrong} of {n_tasks * per_task} outputs used another task's adapters"


def test_batch_is_scoped_to_its_thread_and_nests_across_models():
    model, other = _model(), _model()
    x = torch.randn(ROWS, SEQ, DIM)
    with torch.no_grad():
        plain = model(x)  # the active adapter ("a", the first one added) for every row
        lora_ext.set_adapter(other, "d")
        other_d = other(x)
        lora_ext.set_adapter(other, "a")
        seen = []
        with lora_ext.adapter_batch(model, ["b", "c", lora_ext.BASE]):
            inside = model(x)
            th = threading.Thread(target=lambda: seen.append(model(x)))  # a new thread: no batch
            th.start()
            th.join()
            with lora_ext.adapter_batch(other, ["d"] * ROWS):  # another model: both apply
                torch.testing.assert_close(model(x), inside, rtol=0, atol=0)
                torch.testing.assert_close(other(x), other_d, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(seen[0], plain, rtol=0, atol=0)
        torch.testing.assert_close(model(x), plain, rtol=0, atol=0)  # back to the active adapter
        assert not torch.allclose(inside, plain)
