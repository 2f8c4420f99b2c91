"""Quickstart: add LoRA to the linears of a small (pretend pre-trained) MLP, fine-tune
only the adapters on a synthetic regression task, then merge them into the weights.

Run:  bash scripts/run.sh examples/quickstart.py
"""

import time

import torch
from torch import nn

import lora_ext


def make_mlp(d_in=64, d_hidden=256, d_out=16):
    return nn.Sequential(
        nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out)
    )


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    d_in, d_out, n = 64, 16, 4096
    model = make_mlp(d_in, 256, d_out)
    # The "new task": the base model's outputs shifted by a low-rank linear map of the input.
    shift = (torch.randn(d_out, 4) @ torch.randn(4, d_in)) / d_in**0.5
    x = torch.randn(n, d_in)
    with torch.no_grad():
        target = model(x) + x @ shift.T
    x_val = torch.randn(512, d_in)
    with torch.no_grad():
        target_val = model(x_val) + x_val @ shift.T

    # every nn.Linear becomes a LoraLinear wrapping it (no copy); everything else is frozen
    lora_ext.inject_adapter(
        model, lora_ext.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
    )
    trainable, total = lora_ext.trainable_parameters(model)

    def val_loss():
        model.eval()
        with torch.no_grad():
            return nn.functional.mse_loss(model(x_val), target_val).item()

    loss_before = val_loss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    steps, batch = 300, 256
    t0 = time.perf_counter()
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,))
        loss = nn.functional.mse_loss(model(x[idx]), target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    loss_after = val_loss()

    model.eval()
    with torch.no_grad():
        y_unmerged = model(x_val)
        t0 = time.perf_counter()
        lora_ext.merge(model)
        merge_ms = (time.perf_counter() - t0) * 1e3
        y_merged = model(x_val)
    max_diff = (y_merged - y_unmerged).abs().max().item()

    rows = [
        ("trainable parameters", f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"),
        ("validation MSE before", f"{loss_before:.5f}"),
        (f"validation MSE after {steps} steps", f"{loss_after:.5f}"),
        ("training time", f"{train_s:.2f} s"),
        ("merge time (3 layers)", f"{merge_ms:.2f} ms"),
        ("max |merged - unmerged|", f"{max_diff:.2e}"),
    ]
    w = max(len(k) for k, _ in rows)
    print(f"lora_ext {lora_ext.__version__} quickstart (torch {torch.__version__})")
    print("-" * (w + 40))
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    ok = loss_after < 0.2 * loss_before and max_diff < 1e-4
    print("-" * (w + 40))
    print("OK: the adapters learned the task and merged outputs equal unmerged ones" if ok else "FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
