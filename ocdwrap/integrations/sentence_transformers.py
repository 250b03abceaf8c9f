"""sentence-transformers: OCD on a classifier over sentence embeddings, with ``encode`` kept working.

Two pieces:

* :class:`SentenceClassifier`: a ``SentenceTransformer`` body and a linear head on its embeddings
  (the shape of SetFit's classifier) as one ``nn.Module`` that ocdwrap can wrap, with
  ``encode``, ``predict``, ``predict_proba`` and ``fit_head`` working on lists of sentences.
* :func:`route`: after ``ocd = ocdwrap.wrap(model, ...)`` and fitting, makes every call of the
  wrapped ``SentenceClassifier`` or ``SentenceTransformer`` run through OCD, so the methods users
  already call (``predict``, ``encode``) use the generated weights; ``ocd.disable_adapter()`` gives
  the base behaviour back inside a ``with`` block.

Example:
    >>> st = SentenceTransformer("all-MiniLM-L6-v2")
    >>> clf = SentenceClassifier(st, num_labels=2).fit_head(train_texts, train_labels)
    >>> ocd = ocdwrap.wrap(clf, layer="head", config=OCDConfig(delta="rank1"))
    >>> store = ocdwrap.collect(ocd, clf.batches(train_texts, train_labels), ce, "deltas/")
    >>> ocdwrap.fit(ocd, store)
    >>> with route(ocd):
    ...     labels = clf.predict(test_texts)          # OCD's per-sentence weights
    >>> labels_base = clf.predict(test_texts)          # outside: the base classifier
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..batches import to_device
from ..model import OCDModel


def _is_sentence_transformer(module: nn.Module) -> bool:
    return any(c.__name__ == "SentenceTransformer" for c in type(module).__mro__)


class SentenceClassifier(nn.Module):
    """A ``SentenceTransformer`` body with a linear ``head`` on its sentence embeddings.

    Called like a sentence-transformers model, with the tokenizer's feature dict (``clf(features)``
    or ``clf(**features)``), it returns logits ``(B, num_labels)``. The body is used as is; only the
    head is trained here (:meth:`fit_head`, a logistic regression like SetFit's default head).

    Args:
        body: a ``SentenceTransformer``.
        num_labels: number of classes.
        head: a module from embeddings to logits; default ``nn.Linear(dim, num_labels)``.

    Example:
        >>> clf = SentenceClassifier(load_minilm(), num_labels=2)
        >>> clf.fit_head(["a fine film", "a dull film"], [1, 0]).predict(["fine"])
        tensor([1])
    """

    def __init__(self, body: nn.Module, num_labels: int, *, head: nn.Module | None = None):
        super().__init__()
        if not _is_sentence_transformer(body):
            raise TypeError(
                f"SentenceClassifier needs a sentence_transformers.SentenceTransformer body, got "
                f"{type(body).__name__}."
            )
        self.body = body
        dim_of = (
            getattr(body, "get_embedding_dimension", None) or body.get_sentence_embedding_dimension
        )
        dim = dim_of()
        self.head = head if head is not None else nn.Linear(dim, num_labels)
        self.head.to(body.device)
        self.num_labels = num_labels

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    def forward(
        self, features: Mapping[str, torch.Tensor] | None = None, **kw: Any
    ) -> torch.Tensor:
        feats = dict(features if features is not None else kw)  # the body writes into its input
        emb = self.body(feats)["sentence_embedding"]
        return self.head(emb)

    # --- sentences in, tensors out ---------------------------------------------------------------
    def tokenize(self, sentences: Sequence[str]) -> dict[str, torch.Tensor]:
        """The body's feature dict for ``sentences``, on the model's device."""
        prep = getattr(self.body, "preprocess", None) or self.body.tokenize  # tokenize: ST < 6
        return to_device(dict(prep(list(sentences))), self.device)

    def batches(
        self,
        sentences: Sequence[str],
        labels: torch.Tensor | Sequence[int] | None = None,
        batch_size: int = 32,
    ) -> list:
        """Tokenised batches in order: ``(features, labels)`` pairs, or features when no labels.

        This is the batch form :func:`ocdwrap.collect` and :func:`ocdwrap.evaluate_ocd` read.
        """
        y = None if labels is None else torch.as_tensor(labels, dtype=torch.int64)
        out = []
        for i in range(0, len(sentences), batch_size):
            feats = self.tokenize(sentences[i : i + batch_size])
            out.append(feats if y is None else (feats, y[i : i + batch_size].to(self.device)))
        return out

    def encode(self, sentences: Sequence[str], batch_size: int = 32, **kw: Any) -> torch.Tensor:
        """Sentence embeddings ``(N, dim)`` from the body (``SentenceTransformer.encode``)."""
        kw.setdefault("show_progress_bar", False)
        emb = self.body.encode(list(sentences), batch_size=batch_size, convert_to_tensor=True, **kw)
        return emb.clone()  # a normal tensor, not an inference-mode one

    @torch.no_grad()
    def predict_proba(self, sentences: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Class probabilities ``(N, num_labels)``; through OCD inside :func:`route`."""
        was_training = self.training
        self.eval()
        try:
            probs = [self(f).float().softmax(-1) for f in self.batches(sentences, None, batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(probs) if probs else torch.empty(0, self.num_labels)

    def predict(self, sentences: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Predicted labels ``(N,)``; through OCD inside :func:`route`."""
        return self.predict_proba(sentences, batch_size).argmax(-1)

    def fit_head(
        self,
        sentences: Sequence[str],
        labels: torch.Tensor | Sequence[int],
        *,
        l2: float = 1.0,
        max_iter: int = 200,
        batch_size: int = 32,
    ) -> SentenceClassifier:
        """Train the head on the body's (frozen) embeddings: L2-regularised logistic regression.

        Minimises mean cross-entropy + ``l2 / (2N)`` * ||W||², scikit-learn's
        ``LogisticRegression(C=1/l2)`` objective divided by N, with L-BFGS. Returns ``self``.
        """
        y = torch.as_tensor(labels, dtype=torch.int64).to(self.device)
        emb = self.encode(sentences, batch_size=batch_size).to(self.device)
        head_dtype = next(self.head.parameters()).dtype
        emb = emb.to(head_dtype)
        opt = torch.optim.LBFGS(
            self.head.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe"
        )
        weights = [p for n, p in self.head.named_parameters() if n.endswith("weight")]
        n = len(y)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(self.head(emb).float(), y)
            loss = loss + l2 / (2 * n) * sum((w.float() ** 2).sum() for w in weights)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return self


# --- routing calls through OCD ------------------------------------------------------------------


class route:  # used like a function and as a context manager, hence the lower-case name
    """Make calls of ``model.base_model`` run through OCD, so its own methods use OCD's weights.

    ``model`` is a fitted :class:`~ocdwrap.OCDModel` wrapping a :class:`SentenceClassifier` or a
    ``SentenceTransformer``. While routed, ``clf.predict(...)`` / ``st.encode(...)`` (anything
    that calls the module) returns OCD's output; inside ``model.disable_adapter()`` they return the
    base output. OCD's own passes are not routed. For a ``SentenceTransformer`` (embeddings), an
    ensemble (``num_draws > 1``) averages embeddings as values unless the config names a task.

    Use it as a context manager, or call ``route(model)`` and later ``.remove()``.

    Example:
        >>> ocd = ocdwrap.wrap(st, layer="2.linear")     # a SentenceTransformer's Dense layer
        >>> ...                                          # collect, fit
        >>> with route(ocd):
        ...     emb = st.encode(["a fine film"])         # generated weights, same call
        >>> handle = route(ocd)                          # or for good
        >>> handle.remove()
    """

    def __init__(self, model: OCDModel) -> None:
        if not isinstance(model, OCDModel):
            raise TypeError(f"route() needs an OCDModel, got {type(model).__name__}.")
        model._require_hypernet()
        base = model.base_model
        if getattr(base.forward, "_ocdwrap_route", False):
            raise RuntimeError("This model's calls are already routed through OCD.")
        self.model = model
        self.base = base
        self._had_own = "forward" in base.__dict__
        self._previous = base.__dict__.get("forward")
        original = base.forward  # bound: the class's forward, or one set on the instance before
        state = model._state
        embeddings = _is_sentence_transformer(base) and model.sampling_config.task == "auto"

        def forward(*args: Any, **kwargs: Any) -> Any:
            # OCD's own passes (capture, per-sample deltas) and disable_adapter() reach the base
            if state.disabled or state.delta is not None or state.capture is not None:
                return original(*args, **kwargs)
            as_values = embeddings and "task" not in state.overrides
            ctx = model.sampling(task="regression") if as_values else nullcontext()
            with ctx:
                return model(*args, **kwargs)

        forward._ocdwrap_route = True  # type: ignore[attr-defined]
        base.forward = forward  # ocdwrap.split runs whole passes while forward is patched
        self.active = True

    def remove(self) -> None:
        """Restore the module's own ``forward``."""
        if not self.active:
            return
        if self._had_own:
            self.base.forward = self._previous
        else:
            del self.base.forward
        self.active = False

    def __enter__(self) -> OCDModel:
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self.remove()


__all__ = ["SentenceClassifier", "route"]
