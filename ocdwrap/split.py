"""Running the base model in two parts around the target layer, so repeated passes skip the prefix.

Collection runs the base model K+1 times on the same batch, and an OCD forward runs it twice
(capture, then prediction). Only the target layer's weight changes between those passes, so
everything that does not depend on the layer's output — the prefix, usually most of the network —
computes the same values every time. :class:`SplitModel` traces the base model once with
``torch.fx`` (the target layer as a leaf), keeps the graph's nodes downstream of the layer (the
suffix) apart from the rest, and runs the prefix once and then the suffix once per pass.

The nodes are interpreted against the live base model (modules and attributes are looked up on
every call), so ``.to()``, ``.half()`` or a reloaded state dict are always seen. The split is used
only where it is safe:

* the model traces with ``torch.fx`` (no data-dependent Python control flow; most Hugging Face
  models do not, and keep whole passes) and reaches the target layer exactly once;
* every module is in eval mode (tracing fixes ``self.training`` branches), and the base model has
  no forward hooks of its own and no ``forward`` patched on the instance (the split does not call
  it as a whole, and traces its class's ``forward``);
* on its first use, the split's output (computed twice from one prefix) equals the model's own
  output; otherwise it is switched off for that model with a log message.

Boundary values are cloned before each suffix pass when the suffix has in-place operations, so
a pass cannot change what the next one reads.

To compare with (or rule out) the split, run whole passes for the calls inside a block::

    from ocdwrap.split import whole_passes

    with whole_passes():  # every pass runs the whole base model, as without the split
        logits = model(x)

The block applies to the calls made in its own thread (or asyncio task), and nests.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import operator
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx, nn

from .layer import DynamicLayer

logger = logging.getLogger("ocdwrap")

_WHOLE_PASSES = contextvars.ContextVar("ocdwrap_whole_passes", default=False)

_INPLACE_FUNCTIONS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.imatmul,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.ilshift,
    operator.irshift,
    operator.setitem,
}


@contextlib.contextmanager
def whole_passes() -> Iterator[None]:
    """Run whole passes of the base model, without the split forward, for the calls inside.

    For measuring what the split saves, or ruling it out when a model behaves unexpectedly. The
    results are the same either way (up to floating-point rounding); only the time differs. Applies to this thread (or asyncio
    task), like ``torch.no_grad``; blocks nest.

    Example:
        >>> with whole_passes():
        ...     logits = model(x)  # doctest: +SKIP
    """
    token = _WHOLE_PASSES.set(True)
    try:
        yield
    finally:
        _WHOLE_PASSES.reset(token)


class SplitError(Exception):
    """The model cannot be split at the target layer (it then runs whole passes)."""


class _LeafTracer(fx.Tracer):
    def __init__(self, leaf: nn.Module) -> None:
        super().__init__()
        self.leaf = leaf

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m is self.leaf or super().is_leaf_module(m, qualname)


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _mutates(node: fx.Node, root: nn.Module) -> bool:
    """Whether ``node`` may write into one of its inputs (conservative)."""
    if node.op == "call_method":
        name = str(node.target)
        return (name.endswith("_") and not name.startswith("__")) or name in {
            "__iadd__",
            "__isub__",
            "__imul__",
            "__itruediv__",
            "__setitem__",
        }
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCTIONS or node.kwargs.get("inplace", False):
            return True
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.startswith("__")
    if node.op == "call_module":
        return bool(getattr(_fetch(root, str(node.target)), "inplace", False))
    return False


class SplitModel:
    """The base model's forward cut at the target layer: :meth:`prefix` once, :meth:`suffix` per pass.

    Example:
        >>> split = SplitModel(base, "fc2")
        >>> boundary = split.prefix((x,), {})     # everything that does not depend on fc2
        >>> out = split.suffix(boundary)          # fc2 and what follows; equals base(x)
    """

    def __init__(self, base: nn.Module, layer_name: str) -> None:
        self.base = base
        leaf = base.get_submodule(layer_name)
        if base._forward_hooks or base._forward_pre_hooks or "forward" in vars(base):
            raise SplitError("the base model has forward hooks of its own or a patched forward")
        before = set(vars(base))
        try:
            graph = _LeafTracer(leaf).trace(base)
        except Exception as e:  # data-dependent control flow and friends
            raise SplitError(f"torch.fx cannot trace the model ({type(e).__name__}: {e})") from e
        finally:
            # fx keeps tensors it met outside any module as attributes of the root (the user's
            # model): move them here
            self.constants = {k: vars(base).pop(k) for k in set(vars(base)) - before}
        nodes = list(graph.nodes)
        calls = [n for n in nodes if n.op == "call_module" and n.target == layer_name]
        if len(calls) != 1:
            raise SplitError(f"the traced graph calls {layer_name!r} {len(calls)} times, not once")
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        if any(str(p.target).startswith("*") for p in self.placeholders):
            raise SplitError("the model's forward takes *args or **kwargs")
        down = {calls[0]}
        for n in nodes:
            if n not in down and any(a in down for a in n.all_input_nodes):
                down.add(n)
        if nodes[-1].op != "output" or nodes[-1] not in down:
            raise SplitError("the model's output does not depend on the target layer")
        self.prefix_nodes = [n for n in nodes if n not in down and n.op != "placeholder"]
        self.suffix_nodes = [n for n in nodes if n in down]
        needed = {a for n in self.suffix_nodes for a in n.all_input_nodes if a not in down}
        self.boundary = [n for n in nodes if n in needed]
        self.clone_boundary = any(_mutates(n, base) for n in self.suffix_nodes)
        self.verified: bool | None = None  # set on first use

    # --- running ------------------------------------------------------------------------------
    def _bind(self, args: tuple, kwargs: dict) -> dict[fx.Node, Any]:
        env: dict[fx.Node, Any] = {}
        unknown = set(kwargs) - {str(p.target) for p in self.placeholders}
        if len(args) > len(self.placeholders) or unknown:
            raise TypeError("arguments do not match the traced forward")
        for i, p in enumerate(self.placeholders):
            if i < len(args):
                env[p] = args[i]
            elif p.target in kwargs:
                env[p] = kwargs[p.target]
            elif p.args:  # the default value
                env[p] = p.args[0]
            else:
                raise TypeError(f"missing argument {p.target!r}")
        return env

    def _run(self, nodes: list[fx.Node], env: dict[fx.Node, Any]) -> Any:
        def value(a: Any) -> Any:
            return fx.node.map_arg(a, lambda n: env[n])

        for n in nodes:
            if n.op == "output":
                return value(n.args[0])
            args, kwargs = value(n.args), value(n.kwargs)
            if n.op == "call_module":
                env[n] = _fetch(self.base, str(n.target))(*args, **kwargs)
            elif n.op == "call_function":
                env[n] = n.target(*args, **kwargs)
            elif n.op == "call_method":
                env[n] = getattr(args[0], str(n.target))(*args[1:], **kwargs)
            elif n.op == "get_attr":
                t = str(n.target)
                env[n] = self.constants[t] if t in self.constants else _fetch(self.base, t)
        return None

    def prefix(self, args: tuple, kwargs: dict) -> list[Any]:
        """The values the suffix needs, computed once (everything upstream of the layer)."""
        env = self._bind(args, kwargs)
        self._run(self.prefix_nodes, env)
        return [env[n] for n in self.boundary]

    def suffix(self, boundary: list[Any]) -> Any:
        """The target layer and everything downstream of it: the model's output."""
        if self.clone_boundary:
            boundary = [b.clone() if isinstance(b, torch.Tensor) else b for b in boundary]
        return self._run(self.suffix_nodes, dict(zip(self.boundary, boundary)))

    def verify(self, args: tuple, kwargs: dict, call: Callable[[], Any]) -> bool:
        """Compare two suffix passes from one prefix with ``call()`` (the whole model); remember it."""
        from .batches import read_output

        with torch.no_grad():
            want = read_output(call())
            boundary = self.prefix(args, kwargs)
            outs = [read_output(self.suffix(boundary)) for _ in range(2)]
        ok = all(
            isinstance(o, torch.Tensor)
            and o.shape == want.shape
            and o.dtype == want.dtype
            and torch.allclose(o, want, rtol=1e-5, atol=1e-6, equal_nan=True)
            for o in outs
        )
        self.verified = ok
        if not ok:
            logger.info(
                "ocdwrap: the split forward differs from the model's own; using whole passes."
            )
        return ok


_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def split_for(model: Any, args: tuple, kwargs: dict, call: Callable[[], Any]) -> SplitModel | None:
    """The verified :class:`SplitModel` of an ``OCDModel`` for a call, or None (use whole passes).

    ``call()`` runs the whole base model on the same inputs; it is called once per model, to
    verify the split on its first use.
    """
    if _WHOLE_PASSES.get():
        return None
    base = model.base_model
    # (the dynamic layer itself behaves the same in both modes; its base layer is checked)
    if any(m.training for m in base.modules() if not isinstance(m, DynamicLayer)):
        return None
    with _LOCK:
        split = _SPLITS.get(model, ...)
        if split is ...:
            try:
                split = SplitModel(base, model.layer_name)
            except SplitError as e:
                logger.debug("ocdwrap: no split forward (%s); using whole passes.", e)
                split = None
            _SPLITS[model] = split
    if split is None or split.verified is False:
        return None
    if base._forward_hooks or base._forward_pre_hooks or "forward" in vars(base):
        return None  # hooks of its own, or a forward patched on the instance (not what was traced)
    try:
        if split.verified is None and not split.verify(args, kwargs, call):
            return None
        split._bind(args, kwargs)
    except TypeError:
        return None
    return split
