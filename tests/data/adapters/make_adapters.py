"""Saves two small adapters with the code of the checkout on PYTHONPATH (run once, from the old tree)."""

import os
import sys

import torch
from safetensors.torch import save_file
from torch import nn

import ocdwrap

out_root = sys.argv[1]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 32)
        self.fc2 = nn.Linear(32, 16)
        self.fc3 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def ce(p, y):
    return nn.functional.cross_entropy(p, y, reduction="none")


g = torch.Generator().manual_seed(0)
x = torch.randn(48, 10, generator=g)
y = torch.randint(0, 3, (48,), generator=g)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
probe = torch.randn(5, 10, generator=g)
for name, cfg in {
    "rank1": ocdwrap.OCDConfig(delta="rank1", cond_dim=16, mlp_hidden=16, mlp_layers=2),
    "full": ocdwrap.OCDConfig(
        delta="full", unet_channels=(8, 8), cond_dim=16, mlp_hidden=16, mlp_layers=2
    ),
}.items():
    torch.manual_seed(0)
    base = MLP().eval()
    model = ocdwrap.wrap(base, layer="fc2", config=cfg)
    store = ocdwrap.collect(
        model, loader, ce, f"/tmp/oldstore-{name}", progress=False, overwrite=True
    )
    ocdwrap.fit(model, store, steps=20, batch_size=16, progress=False)
    d = os.path.join(out_root, f"v0.1.0-{name}")
    model.save_pretrained(d, overwrite=True)
    with model.sampling(seed=0):
        one = model(probe)
    with model.sampling(seed=1, num_draws=3):
        three = model(probe)
    save_file(
        {"input": probe, "one_draw": one.contiguous(), "three_draws": three.contiguous()},
        os.path.join(d, "expected_outputs.safetensors"),
    )
    print(name, one[0])
