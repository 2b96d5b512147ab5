"""Rewrite a model with approx_bp, train it a few steps, look at the report, save and reload.

    python examples/quickstart.py
"""

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import rewrite
from rewrite import optimize, zoo
from rewrite.diff import graph_diff
from rewrite.html_report import write_html

model, (images,) = zoo.build("vit", batch=8)
labels = torch.randint(0, 10, (8,))

m = optimize(model, passes=["approx_bp"], example_inputs=(images,))
print(m.report)
print(graph_diff(m.before, m.after, context=0))

optimizer = torch.optim.AdamW(m.parameters(), lr=1e-3)
for step in range(3):
    optimizer.zero_grad()
    loss = F.cross_entropy(m(images), labels)
    loss.backward()
    optimizer.step()
    print(f"step {step}: loss {loss.item():.4f}")

m.eval()
with tempfile.TemporaryDirectory() as folder:
    path = rewrite.save(m, Path(folder) / "vit.pt2")
    loaded = rewrite.load(path)
    same = torch.allclose(loaded(images), m(images))
    print(f"saved and reloaded {path.name}: outputs equal: {same}")
    write_html(m.report, Path(folder) / "report.html")
