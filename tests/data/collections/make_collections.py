"""Saves small delta collections and a fit checkpoint with the code on PYTHONPATH (run once, from
the old tree; see README.md beside this file)."""

import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from torch import nn

import ocdwrap

out_root = sys.argv[1]


class Net(nn.Module):
    """A Linear target on vectors (fc2) and a Conv2d target (conv)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 6 * 6, 24)
        self.fc2 = nn.Linear(24, 12)
        self.fc3 = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


def ce(p, y):
    return nn.functional.cross_entropy(p, y, reduction="none")


def base() -> Net:
    torch.manual_seed(0)
    return Net().eval()


g = torch.Generator().manual_seed(0)
x = torch.randn(40, 1, 6, 6, generator=g)
y = torch.randint(0, 3, (40,), generator=g)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
save_file({"x": x, "y": y}, os.path.join(out_root, "data.safetensors"))


class Interrupted(Exception):
    pass


def first_batches(n):
    for i, batch in enumerate(loader):
        if i == n:
            raise Interrupted
        yield batch


settings = {
    "rank1": ("fc2", ocdwrap.OCDConfig(delta="rank1", shard_size=16)),
    "full": ("fc2", ocdwrap.OCDConfig(delta="full", shard_size=16)),
    "lowrank": ("conv", ocdwrap.OCDConfig(delta="lowrank", delta_rank=2, shard_size=16)),
}
for name, (layer, cfg) in settings.items():
    d = os.path.join(out_root, f"v0.1.0-{name}")
    shutil.rmtree(d, ignore_errors=True)
    model = ocdwrap.wrap(base(), layer=layer, config=cfg)
    ocdwrap.collect(model, loader, ce, d, progress=False)

# a rank-one collection interrupted after 3 batches (one shard of 16 written, 8 samples lost)
d = os.path.join(out_root, "v0.1.0-rank1-interrupted")
shutil.rmtree(d, ignore_errors=True)
model = ocdwrap.wrap(base(), layer="fc2", config=settings["rank1"][1])
try:
    ocdwrap.collect(model, first_batches(3), ce, d, progress=False)
except Interrupted:
    pass

# a fit checkpoint after 4 of 8 steps, on the rank-one collection
cfg = ocdwrap.OCDConfig(
    delta="rank1", shard_size=16, cond_dim=16, mlp_hidden=16, mlp_layers=2, checkpoint_every=4
)
model = ocdwrap.wrap(base(), layer="fc2", config=cfg)
store = ocdwrap.DeltaStore(os.path.join(out_root, "v0.1.0-rank1"))
ckpt = os.path.join(out_root, "v0.1.0-fit-checkpoint")
shutil.rmtree(ckpt, ignore_errors=True)


class Stop(Exception):
    pass


# fit 8 steps uninterrupted (the expected result), then fit again stopped after the checkpoint
ocdwrap.fit(model, store, steps=8, batch_size=8, progress=False, seed=0)
full_state = {k: v.clone() for k, v in model.hypernet.state_dict().items()}
save_file(full_state, os.path.join(out_root, "fit_8_steps_expected.safetensors"))
model = ocdwrap.wrap(base(), layer="fc2", config=cfg)
# a fit of 8 steps stopped right after its checkpoint at step 4 (the run id names 8 steps)
fitmod = sys.modules["ocdwrap.fit"]  # the module (ocdwrap.fit is the function)

original = fitmod._Checkpoint.save


def save_then_stop(self, step, *args):
    original(self, step, *args)
    raise Stop


fitmod._Checkpoint.save = save_then_stop
try:
    ocdwrap.fit(model, store, steps=8, batch_size=8, progress=False, seed=0, checkpoint_dir=ckpt)
except Stop:
    pass
fitmod._Checkpoint.save = original
print(sorted(os.listdir(out_root)))
