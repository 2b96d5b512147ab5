"""Train a model in about half the activation memory with remat, and check what it did.

    python examples/remat_training.py
"""

import torch
import torch.nn.functional as F

from passes import Remat
from rewrite import optimize, zoo
from rewrite.memory import measure_peak

model, (images,) = zoo.build("vit", batch=16)
labels = torch.randint(0, 10, (16,))
reference = zoo.build("vit", batch=16)[0]  # the same weights (seed 0), trained without remat

m = optimize(model, [Remat(budget=0.5, time_limit=10)], example_inputs=(images,))
print(m.report)


def step(module, optimizer):
    optimizer.zero_grad()
    loss = F.cross_entropy(module(images), labels)
    loss.backward()
    optimizer.step()
    return loss.item()


opt, opt_ref = torch.optim.SGD(m.parameters(), lr=0.05), torch.optim.SGD(reference.parameters(), lr=0.05)
for i in range(3):
    peak = measure_peak(lambda: step(m, opt))
    peak_ref = measure_peak(lambda: step(reference, opt_ref))
    same = torch.allclose(
        torch.cat([p.detach().flatten() for p in m.parameters()]),
        torch.cat([p.detach().flatten() for p in reference.parameters()]),
        atol=1e-6,
    )
    print(f"step {i}: peak {peak / 2**20:.1f} MiB with remat, {peak_ref / 2**20:.1f} MiB without; weights equal: {same}")
