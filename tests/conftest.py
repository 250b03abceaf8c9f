"""Tiny models built locally from configs (no hub), shared by the tests."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


class MLP(nn.Module):
    def __init__(self, d_in: int = 10, d_hidden: int = 32, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, 16)
        self.fc3 = nn.Linear(16, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@dataclass
class Case:
    """A base model, a target layer, a batch maker and a per-sample loss."""

    name: str
    make: Callable[[], nn.Module]
    layer: str
    inputs: Callable[[int], Any]  # batch size -> inputs
    targets: Callable[[int], torch.Tensor]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _ce(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(pred, y, reduction="none")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP().eval()


def make_lenet() -> nn.Module:
    from benchmarks.zoo import LeNet5

    torch.manual_seed(0)
    return LeNet5().eval()


def make_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).eval()


def bert_inputs(b: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 50, (b, 7), generator=_gen(b))
    mask = torch.ones(b, 7, dtype=torch.long)
    if b > 1:
        mask[1, 5:] = 0  # one padded sample
    return {"input_ids": ids, "attention_mask": mask}


def make_resnet() -> nn.Module:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    return resnet18(num_classes=10).eval()


_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(40)]


@pytest.fixture(scope="session")
def tiny_st_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny BERT + tokenizer saved locally, for sentence-transformers."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny-st")
    (d / "vocab.txt").write_text("\n".join(_VOCAB) + "\n")
    tok = BertTokenizerFast(vocab_file=str(d / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(_VOCAB),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(cfg).save_pretrained(str(d))
    return str(d)


def make_st(path: str) -> nn.Module:
    from sentence_transformers import SentenceTransformer, models

    torch.manual_seed(0)
    word = models.Transformer(path)
    pool = models.Pooling(word.get_word_embedding_dimension(), pooling_mode="mean")
    dense = models.Dense(in_features=16, out_features=3, activation_function=nn.Identity())
    return SentenceTransformer(modules=[word, pool, dense], device="cpu").eval()


def st_inputs(model: nn.Module, b: int) -> dict[str, torch.Tensor]:
    texts = [" ".join(f"w{(i * 7 + j) % 40}" for j in range(2 + i % 4)) for i in range(b)]
    return dict(model.tokenize(texts))


def mlp_case() -> Case:
    return Case(
        "mlp",
        make_mlp,
        "fc2",
        lambda b: torch.randn(b, 10, generator=_gen(b)),
        lambda b: torch.arange(b) % 3,
        _ce,
    )


def lenet_linear_case() -> Case:
    return Case(
        "lenet-fc2",
        make_lenet,
        "fc2",
        lambda b: torch.randn(b, 1, 28, 28, generator=_gen(b)),
        lambda b: torch.arange(b) % 10,
        _ce,
    )


def lenet_conv_case() -> Case:
    return Case(
        "lenet-conv2",
        make_lenet,
        "conv2",
        lambda b: torch.randn(b, 1, 28, 28, generator=_gen(b)),
        lambda b: torch.arange(b) % 10,
        _ce,
    )


def bert_case() -> Case:
    return Case(
        "bert-classifier", make_bert, "classifier", bert_inputs, lambda b: torch.arange(b) % 3, _ce
    )


def bert_seq_case() -> Case:
    return Case(
        "bert-ffn",
        make_bert,
        "bert.encoder.layer.0.output.dense",
        bert_inputs,
        lambda b: torch.arange(b) % 3,
        _ce,
    )


def resnet_case(layer: str = "fc") -> Case:
    return Case(
        f"resnet18-{layer}",
        make_resnet,
        layer,
        lambda b: torch.randn(b, 3, 32, 32, generator=_gen(b)),
        lambda b: torch.arange(b) % 10,
        _ce,
    )


def flip_byte(path: str | os.PathLike, key: str | None = None, *, bit: int = 0x10) -> int:
    """Flip one bit of a file in place and return the byte's offset.

    With ``key`` the file is read as safetensors and the byte is the middle one of that tensor's
    data (past the header), so the flip changes a value that a reader of ``key`` uses; without
    it, the middle byte of the file.
    """
    import json

    with open(path, "rb") as f:
        data = bytearray(f.read())
    if key is None:
        at = len(data) // 2
    else:
        n = int.from_bytes(data[:8], "little")
        lo, hi = json.loads(data[8 : 8 + n])[key]["data_offsets"]
        at = 8 + n + (lo + hi) // 2
    data[at] ^= bit
    with open(path, "wb") as f:
        f.write(bytes(data))
    return at
