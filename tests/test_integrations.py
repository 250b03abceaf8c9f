"""Integrations: the Hugging Face Trainer callback, sentence-transformers, torchvision models by
layer name, and the command line. Every model is tiny and built from a config (no hub)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_bert, make_st, st_inputs
from torch import nn

import ocdwrap
from ocdwrap.cli import main
from ocdwrap.describe import describe

CE = nn.CrossEntropyLoss(reduction="none")


def tiny(**kw) -> ocdwrap.OCDConfig:
    base = dict(delta="rank1", unet_channels=(8, 8), mlp_hidden=16, cond_dim=16)
    base.update(kw)
    return ocdwrap.OCDConfig(**base)


FIT = ocdwrap.FitArgs(steps=4, batch_size=8, checkpoint_every=2)  # with tiny()'s adapters


# --- Hugging Face Trainer ------------------------------------------------------------------------


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 50, (n, 7), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(7, dtype=torch.long),
            "labels": self.labels[i],
        }


def _trainer(model, out, callback, train=None):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=1,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    return Trainer(
        model=model, args=args, train_dataset=train or DictDataset(24), callbacks=[callback]
    )


def test_trainer_callback_collects_fits_and_saves_only_the_adapter(tmp_path):
    from ocdwrap.integrations.transformers import OCDTrainerCallback

    model = make_bert().train()
    callback = OCDTrainerCallback(
        layer="classifier",
        config=tiny(),
        fit_args=FIT,
        sampling=ocdwrap.SamplingConfig(seed=0),
        eval_dataset=DictDataset(8, seed=1),
        progress=False,
    )
    trainer = _trainer(model, tmp_path, callback)
    trainer.train()
    adapter = tmp_path / "ocd_adapter"
    assert callback.adapter_dir == str(adapter)
    assert sorted(os.listdir(adapter)) == [
        "README.md",
        "ocd_config.json",
        "ocd_files.json",
        "ocd_model.safetensors",
        "ocd_sampling.json",
    ]
    assert not (tmp_path / "ocd_deltas").exists()  # keep_deltas=False
    assert not (tmp_path / "ocd_fit_checkpoint").exists()
    # the Trainer's model is given back untouched: plain layer, trainable, same keys
    assert type(model.classifier) is nn.Linear
    assert all(p.requires_grad for p in model.parameters())
    assert model.training
    assert "classifier.weight" in model.state_dict()
    assert callback.report is not None and callback.report.steps == 4
    assert set(callback.metrics) >= {"base_eval_loss", "ocd_eval_loss", "ocd_eval_accuracy"}
    logged = [h for h in trainer.state.log_history if "ocd_layer" in h]
    assert logged and logged[0]["ocd_samples"] == 24 and logged[0]["ocd_layer"] == "classifier"
    # the adapter loads onto the trained model (as a reload of output_dir would give)
    ocd = ocdwrap.OCDModel.from_pretrained(model, adapter)
    batch = DictDataset(4, seed=2)[0]
    out = ocd(input_ids=batch["input_ids"][None], attention_mask=batch["attention_mask"][None])
    assert out.logits.shape == (1, 3)


def test_trainer_callback_auto_layer_and_kept_deltas(tmp_path):
    from ocdwrap.integrations.transformers import OCDTrainerCallback

    callback = OCDTrainerCallback(
        layer="auto",
        config=tiny(delta="full", generator="regression"),
        fit_args=FIT,
        selection={"draws": 4},
        keep_deltas=True,
        calibration_samples=8,
        max_samples=16,
        progress=False,
    )
    _trainer(make_bert(), tmp_path, callback).train()
    assert callback.layer != "auto" and callback.layer in dict(make_bert().named_modules())
    store = ocdwrap.DeltaStore(tmp_path / "ocd_deltas")
    assert len(store) == 16 and store.layer == callback.layer
    assert (tmp_path / "ocd_adapter" / "ocd_model.safetensors").exists()


def test_hf_loss_fn_follows_problem_type():
    from transformers import BertConfig

    from ocdwrap.integrations.transformers import hf_loss_fn

    logits = torch.randn(4, 3)
    ce = hf_loss_fn(BertConfig(num_labels=3))
    torch.testing.assert_close(
        ce(logits, torch.tensor([0, 1, 2, 0])), CE(logits, torch.tensor([0, 1, 2, 0]))
    )
    mse = hf_loss_fn(BertConfig(num_labels=1))
    assert mse(torch.ones(4, 1), torch.zeros(4)).tolist() == [1.0] * 4
    bce = hf_loss_fn(BertConfig(num_labels=3, problem_type="multi_label_classification"))
    assert bce(logits, torch.ones(4, 3)).shape == (4,)
    tokens = torch.randn(2, 5, 3)
    labels = torch.tensor([[0, 1, 2, -100, -100], [1, 1, 1, 1, 1]])
    per_sample = ce(tokens, labels)
    assert per_sample.shape == (2,)
    want = nn.functional.cross_entropy(tokens[0, :3], labels[0, :3], reduction="sum")
    torch.testing.assert_close(per_sample[0], want)


# --- sentence-transformers -----------------------------------------------------------------------


def _st_body(path: str):
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Pooling, Transformer

    torch.manual_seed(0)
    word = Transformer(path)
    pool = Pooling(word.get_embedding_dimension(), pooling_mode="mean")
    return SentenceTransformer(modules=[word, pool], device="cpu").eval()


SENTENCES = [" ".join(f"w{(i * 7 + j) % 40}" for j in range(2 + i % 4)) for i in range(16)]
LABELS = torch.tensor([i % 2 for i in range(16)])


def test_sentence_classifier_through_ocd(tiny_st_dir, tmp_path):
    from ocdwrap.integrations.sentence_transformers import SentenceClassifier, route

    clf = SentenceClassifier(_st_body(tiny_st_dir), num_labels=2).fit_head(SENTENCES, LABELS)
    base_pred = clf.predict(SENTENCES)
    assert base_pred.shape == (16,)
    ocd = ocdwrap.wrap(clf, layer="head", config=tiny(generator="regression"))
    store = ocdwrap.collect(ocd, clf.batches(SENTENCES, LABELS, 8), CE, tmp_path / "d")
    assert len(store) == 16
    ocdwrap.fit(ocd, store, FIT, progress=False)
    feats = clf.tokenize(SENTENCES)
    want = ocd(feats).softmax(-1)
    with route(ocd) as routed:
        assert routed is ocd
        got = clf.predict_proba(SENTENCES, batch_size=16)
        with ocd.disable_adapter():
            torch.testing.assert_close(clf.predict(SENTENCES), base_pred)
        # OCD's own calls are not routed twice
        torch.testing.assert_close(ocd(feats).softmax(-1), want)
    torch.testing.assert_close(got, want)
    assert torch.equal(clf.predict(SENTENCES), base_pred)  # the route is gone
    assert "forward" not in clf.__dict__
    res = ocdwrap.evaluate_ocd(ocd, clf.batches(SENTENCES, LABELS), CE)
    assert res["n"] == 16


def test_route_keeps_sentence_transformer_encode(tiny_st_dir, tmp_path):
    from ocdwrap.integrations.sentence_transformers import route

    st = make_st(tiny_st_dir)  # Transformer, Pooling, Dense(16 -> 3)
    base_emb = st.encode(SENTENCES, convert_to_tensor=True)
    ocd = ocdwrap.wrap(st, layer="2.linear", config=tiny(generator="regression"))
    batches = [
        (st_inputs(st, 8), torch.arange(8) % 3),
        (st_inputs(st, 8), torch.arange(8) % 3),
    ]
    ocdwrap.fit(ocd, ocdwrap.collect(ocd, batches, CE, tmp_path / "d"), FIT, progress=False)
    feats = dict(st.tokenize(SENTENCES))
    want = ocd(dict(feats))["sentence_embedding"]
    handle = route(ocd)
    try:
        got = st.encode(SENTENCES, convert_to_tensor=True, batch_size=16)
        with ocd.disable_adapter():
            torch.testing.assert_close(st.encode(SENTENCES, convert_to_tensor=True), base_emb)
        with pytest.raises(RuntimeError, match="already routed"):
            route(ocd)
        # an ensemble of embeddings averages values (not softmax probabilities)
        with ocd.sampling(num_draws=3):
            ens = st.encode(SENTENCES[:2], convert_to_tensor=True)
        assert ens.shape == (2, 3)
    finally:
        handle.remove()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, base_emb)
    torch.testing.assert_close(st.encode(SENTENCES, convert_to_tensor=True), base_emb)


def test_route_on_a_traceable_model(tmp_path):
    """A model torch.fx can trace (ocdwrap.split's fast path), loaded and routed before its first
    call: direct calls of the OCDModel and routed calls of the base agree, with no recursion."""
    from ocdwrap.integrations.sentence_transformers import route

    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()

    x, y = torch.randn(8, 6), torch.arange(8) % 3
    fitted = ocdwrap.wrap(make(), layer="2", config=tiny(generator="regression"))
    ocdwrap.fit(
        fitted,
        ocdwrap.collect(fitted, [(x, y)], CE, tmp_path / "d"),
        FIT,
        progress=False,
    )
    fitted.save_pretrained(tmp_path / "adapter")
    want = fitted(x)

    base = make()
    with torch.no_grad():
        plain = base(x)
    ocd = ocdwrap.OCDModel.from_pretrained(base, tmp_path / "adapter")
    with route(ocd):  # routed before the model's first call
        direct = ocd(x)
        routed = base(x)
        with ocd.disable_adapter():
            torch.testing.assert_close(base(x), plain)
    torch.testing.assert_close(direct, want)
    torch.testing.assert_close(routed, want)
    assert not torch.equal(want, plain)
    torch.testing.assert_close(base(x), plain)
    assert not base._forward_pre_hooks


def test_route_needs_a_fitted_model():
    from ocdwrap.errors import NotFittedError
    from ocdwrap.integrations.sentence_transformers import route

    model = ocdwrap.wrap(nn.Sequential(nn.Linear(3, 3)), layer="0")
    with pytest.raises(NotFittedError):
        route(model)


# --- torchvision models by layer name ------------------------------------------------------------


@pytest.mark.parametrize(
    "name,layer,delta",
    [
        ("mobilenet_v2", "classifier.1", "rank1"),  # the Linear head inside a Sequential
        ("squeezenet1_1", "classifier.1", "full"),  # a 1x1 Conv2d classifier
        ("resnet18", "layer1.0.conv2", "full"),  # a Conv2d inside a residual block
    ],
)
def test_torchvision_models_by_layer_name(name, layer, delta, tmp_path):
    import torchvision

    torch.manual_seed(0)
    base = getattr(torchvision.models, name)(num_classes=4).eval()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    y = torch.arange(4) % 4
    with torch.no_grad():
        ref = base(x)
    model = ocdwrap.wrap(base, layer=layer, config=tiny(delta=delta, generator="regression"))
    store = ocdwrap.collect(model, [(x, y)], CE, tmp_path / "d")
    assert store.weight_shape == tuple(dict(base.named_modules())[layer].base_layer.weight.shape)
    ocdwrap.fit(model, store, FIT, progress=False)
    out = model(x)
    assert out.shape == ref.shape
    with model.disable_adapter():
        torch.testing.assert_close(model(x), ref)


# --- the command line ----------------------------------------------------------------------------

PIPELINE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from benchmarks.datasets import tensor_loader

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))

    def data():
        g = torch.Generator().manual_seed(0)
        return tensor_loader(torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g), 8)
    """
)


@pytest.fixture
def pipeline(tmp_path) -> str:
    path = tmp_path / "pipeline.py"
    path.write_text(PIPELINE)
    return str(path)


def test_cli_collect_fit_evaluate_info(pipeline, tmp_path, capsys):
    deltas, adapter = str(tmp_path / "deltas"), str(tmp_path / "adapter")
    m, d = f"{pipeline}:model", f"{pipeline}:data"
    assert main(["collect", "--model", m, "--data", d, "--layer", "2", "--out", deltas,
                 "--set", "delta=rank1", "mlp_hidden=16", "cond_dim=16"]) == 0  # fmt: skip
    assert "samples" in capsys.readouterr().out
    assert main(["fit", "--model", m, "--deltas", deltas, "--out", adapter, "--steps", "3"]) == 0
    assert "adapter saved" in capsys.readouterr().out
    assert main(["evaluate", "--model", m, "--data", d, "--adapter", adapter, "--json",
                 "--modes", "base,ocd,overfit", "--num-draws", "2"]) == 0  # fmt: skip
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {"base", "ocd(2)", "overfit"} and res["base"]["n"] == 24

    assert main(["info", adapter, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "adapter" and info["layer"] == "2"
    assert info["config"]["delta"] == "rank1" and info["config"]["library_version"]
    assert "Fit" in info["model_card"]["sections"]  # the card, read back
    assert "3 steps on 24 collected samples" in (Path(adapter) / "README.md").read_text()
    assert info["parameters"]["generator"] > 0
    assert main(["info", deltas]) == 0
    text = capsys.readouterr().out
    assert "collection" in text and "24 (complete: the whole data)" in text
    assert "xxh3_64 per tensor" in text
    infos = describe(str(tmp_path))  # a folder holding both, one level down
    assert {i["kind"] for i in infos} == {"adapter", "collection"}


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds no ocdwrap adapter" in err and "Traceback" not in err
    assert main(["collect", "--model", "nocolon", "--data", "x:y", "--out", "o"]) == 2


def test_python_dash_m_entry_point(tmp_path):
    x = torch.randn(8, 4)
    model = ocdwrap.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), layer="1", config=tiny())
    store = ocdwrap.collect(model, [(x, torch.arange(8) % 2)], CE, tmp_path / "d", progress=False)
    out = subprocess.run(
        [sys.executable, "-m", "ocdwrap", "info", store.directory, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    info = json.loads(out.stdout)
    assert info["samples"] == 8 and info["stored"] == store.keys
