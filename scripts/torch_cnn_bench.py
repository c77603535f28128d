#!/usr/bin/env python3
"""PyTorch reference for `flotilla-sim gpu-check` and the CPU backend table: McMahan et al.'s
MNIST CNN (5x5 conv 32, 2x2 max-pool, 5x5 conv 64, 2x2 max-pool, fc 512, fc 10; "same"
padding; 1,663,370 parameters), plain SGD, one epoch over N random MNIST-shaped examples,
samples/s as the median of REPEATS timed epochs after a warm-up epoch, at B = 10, 50, 256.

    python3 scripts/torch_cnn_bench.py [cpu|cuda] [N] [REPEATS] [BATCHES, e.g. 10,50,256]

On CUDA it also measures bf16 autocast (PyTorch's mixed precision: f32 weights, bf16 compute).
"""
import sys
import time

import torch
from torch import nn


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 512), nn.ReLU(), nn.Linear(512, 10))


def epoch(model, opt, x, y, batch, device, amp):
    loss_fn = nn.CrossEntropyLoss()
    for i in range(0, len(x), batch):
        xb = x[i:i + batch].to(device, non_blocking=True)
        yb = y[i:i + batch].to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
    # The update read back to the host, as Flotilla's trainer does.
    torch.cat([p.detach().flatten() for p in model.parameters()]).cpu()


def main():
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    batches = [int(b) for b in sys.argv[4].split(",")] if len(sys.argv) > 4 else [10, 50, 256]
    torch.manual_seed(1)
    x = torch.rand(n, 1, 28, 28)
    y = torch.randint(0, 10, (n,))
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    print("| framework | device | precision | B | samples/s |\n|---|---|---|---:|---:|")
    for batch in batches:
        for amp in ([False, True] if device == "cuda" else [False]):
            model = cnn().to(device)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            epoch(model, opt, x, y, batch, device, amp)
            runs = []
            for _ in range(repeats):
                t = time.perf_counter()
                epoch(model, opt, x, y, batch, device, amp)
                runs.append(n / (time.perf_counter() - t))
            runs.sort()
            prec = "bf16 autocast" if amp else "f32"
            print(f"| PyTorch | {device} | {prec} | {batch} | {runs[len(runs) // 2]:.0f} |")


if __name__ == "__main__":
    main()
