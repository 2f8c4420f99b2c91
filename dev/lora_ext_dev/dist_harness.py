"""``run_ranks``: run a function in N forked processes that form a gloo process group on localhost.

No ``torch.testing._internal``. The parent holds the rendezvous store (a ``TCPStore`` on a port
the OS picks, so there is no race for a free port); each child sets ``torch.set_num_threads(1)``,
joins the group, runs ``fn(rank, world_size, *args)``, destroys the group and sends back its
return value, pickled, or its traceback. An exception in any rank is re-raised in the parent as a
:class:`RankError` naming the rank, with that rank's traceback (and the original exception as its
cause when it pickles); the other ranks are killed at once instead of waiting in a collective.
A world that does not finish within ``timeout`` seconds is killed and raises ``TimeoutError``, so
a hung collective fails the test instead of hanging CI.

One world is meant to serve many checks: ``fn`` runs several of them and returns their results
(tensors, numbers, strings) for the test functions to compare with a single-process reference.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import time
import traceback
from multiprocessing.connection import wait

import torch
import torch.distributed as dist

HOST = "127.0.0.1"


class RankError(RuntimeError):
    """An exception raised in one rank of :func:`run_ranks`."""

    def __init__(self, rank: int, world_size: int, remote_traceback: str):
        super().__init__(f"rank {rank} of {world_size} raised:\n{remote_traceback}")
        self.rank = rank
        self.remote_traceback = remote_traceback


def _child(fn, rank: int, world_size: int, store_port: int, timeout: float, conn, args) -> None:
    try:
        torch.set_num_threads(1)
        if os.path.exists("/sys/class/net/lo"):  # gloo on the loopback device, whatever the host name resolves to
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        # the parent's deadline comes first: it kills the world and says which ranks hung
        delta = datetime.timedelta(seconds=timeout + 60)
        store = dist.TCPStore(HOST, store_port, is_master=False, timeout=delta)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=delta)
        payload = pickle.dumps(("ok", fn(rank, world_size, *args)))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        tb = traceback.format_exc()
        try:
            exc = pickle.dumps(e)
            pickle.loads(exc)
        except Exception:  # noqa: BLE001 - an exception that does not pickle: the traceback says it all
            exc = None
        payload = pickle.dumps(("error", tb, exc, time.time()))
    conn.send_bytes(payload)  # before tearing down: a failure reaches the parent at once
    conn.close()
    if dist.is_initialized():
        dist.destroy_process_group()


def timed_world(fn, world_size: int, tmp_path_factory, label: str, timeout: float = 120.0) -> list:
    """``run_ranks(fn, world_size, <a fresh tmp folder>)`` for a module-scoped fixture: one process world
    serving many checks; prints how long it took."""
    start = time.perf_counter()
    ranks = run_ranks(fn, world_size, str(tmp_path_factory.mktemp(label)), timeout=timeout)
    print(f"\n{label} world ({world_size} ranks): {time.perf_counter() - start:.1f} s")
    return ranks


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` forked processes joined in a gloo
    process group; returns the ranks' return values, by rank. ``fn`` and ``args`` are inherited
    through fork (no pickling); return values must pickle."""
    if not dist.is_available():
        raise RuntimeError("run_ranks: expected torch.distributed to be available, got a torch without it")
    ctx = mp.get_context("fork")
    store = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout))
    procs, conns = [], []
    try:
        for rank in range(world_size):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=_child,
                args=(fn, rank, world_size, store.port, timeout, send, args),
                name=f"rank{rank}",
                daemon=True,
            )
            p.start()
            send.close()
            procs.append(p)
            conns.append(recv)
        results: dict[int, object] = {}
        errors: dict[int, tuple[float, str, object]] = {}  # rank -> (when, traceback, exception)
        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < world_size:
            pending = [r for r in range(world_size) if r not in results and r not in errors]
            left = deadline - time.monotonic()
            if left <= 0:
                if errors:
                    break
                raise TimeoutError(
                    f"run_ranks: ranks {pending} of {world_size} did not finish within {timeout} s "
                    "(a hung collective, or a rank waiting for one that failed)"
                )
            ready = wait([conns[r] for r in pending] + [procs[r].sentinel for r in pending], timeout=left)
            for r in pending:
                if conns[r] in ready or (procs[r].sentinel in ready and conns[r].poll()):
                    try:
                        message = pickle.loads(conns[r].recv_bytes())
                    except EOFError:
                        procs[r].join(5)
                        message = (
                            "error",
                            f"exited with code {procs[r].exitcode} without a result "
                            "(killed, or crashed in native code)",
                            None,
                            time.time(),
                        )
                elif procs[r].sentinel in ready:
                    procs[r].join(5)
                    message = ("error", f"exited with code {procs[r].exitcode} without a result", None, time.time())
                else:
                    continue
                if message[0] == "ok":
                    results[r] = message[1]
                else:
                    if not errors:  # the other ranks often fail in turn (a peer left): the earliest is the cause
                        deadline = min(deadline, time.monotonic() + 2.0)
                    errors[r] = (message[3], message[1], message[2])
        if errors:
            r = min(errors, key=lambda k: errors[k][0])
            _, tb, exc = errors[r]
            others = sorted(set(errors) - {r})
            note = f"\n(ranks {others} failed after it)" if others else ""
            raise RankError(r, world_size, tb + note) from (pickle.loads(exc) if exc is not None else None)
        return [results[r] for r in range(world_size)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(10)
        for c in conns:
            c.close()
        del store


ADAMW_LR = 1e-2


def sgd_then_adamw(step: int, params, opt, sgd_steps: int):
    """The distributed tests' optimizer schedule: SGD(lr 0.1) for ``sgd_steps`` steps, then AdamW(lr ADAMW_LR)."""
    if step == 0:
        return torch.optim.SGD(params, lr=0.1)
    if step == sgd_steps:
        return torch.optim.AdamW(params, lr=ADAMW_LR)
    return opt


def value_error(fn) -> str | None:
    """The message of the ``ValueError`` ``fn()`` raises, or None (ranks return it for the parent to check)."""
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def file_hashes(folder: str) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path (saves compared byte for byte)."""
    import hashlib

    out = {}
    for root, _, names in os.walk(folder):
        for f in names:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out
