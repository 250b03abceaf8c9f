"""Adapters saved by an earlier release load and predict the same today (tests/data/adapters)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import ocdwrap

HERE = os.path.join(os.path.dirname(__file__), "data", "adapters")


class MLP(nn.Module):  # the base model tests/data/adapters/make_adapters.py fitted them on
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 32)
        self.fc2 = nn.Linear(32, 16)
        self.fc3 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("name", ["v0.1.0-rank1", "v0.1.0-full"])
def test_adapter_saved_by_v0_1_0_predicts_the_same(name: str) -> None:
    directory = os.path.join(HERE, name)
    expected = load_file(os.path.join(directory, "expected_outputs.safetensors"))
    torch.manual_seed(0)
    model = ocdwrap.OCDModel.from_pretrained(MLP().eval(), directory)
    with model.sampling(seed=0):
        one = model(expected["input"])
    with model.sampling(seed=1, num_draws=3):
        three = model(expected["input"])
    torch.testing.assert_close(one, expected["one_draw"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(three, expected["three_draws"], rtol=1e-5, atol=1e-6)
    with model.disable_ocd():  # and the adapter changes the prediction (a non-trivial check)
        assert not torch.allclose(model(expected["input"]), expected["one_draw"])


def test_missing_adapter_files_raise_an_ocd_error(tmp_path) -> None:
    with pytest.raises(ocdwrap.OCDError, match="does not exist") as err:
        ocdwrap.OCDModel.from_pretrained(MLP(), tmp_path / "nowhere")
    assert isinstance(err.value, FileNotFoundError)  # also what callers caught before
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "ocd_config.json").write_text(
        open(os.path.join(HERE, "v0.1.0-rank1", "ocd_config.json")).read()
    )
    with pytest.raises(ocdwrap.OCDError, match="lacks ocd_model.safetensors"):
        ocdwrap.OCDModel.from_pretrained(MLP(), partial)
