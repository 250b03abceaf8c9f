"""What :func:`ocdwrap.select_layer` returns: every candidate layer's loss-entropy score, best
first, with the settings that produced them (``LayerScores``; printed as a table)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class LayerScore:
    """The score of one candidate layer.

    ``released_score`` is a variant criterion on the same losses (the field keeps its old name;
    the authors' public repository holds no layer-selection code), for comparison only: for
    each draw, the entropy across calibration samples of the loss (same KDE), then the maximum
    over draws. Ranking uses ``score`` (the paper's formula).
    """

    name: str
    score: float  # sum over calibration samples of the loss entropy across draws
    weight_shape: tuple[int, ...]
    num_params: int  # elements of the weight
    loss_std: float  # mean over samples of the loss std across draws
    vectorized: bool  # draws evaluated with torch.func.vmap (False: one draw per call)
    released_score: float = float("nan")  # a variant criterion (see the docstring), for comparison


@dataclass
class LayerScores:
    """Every candidate's score, best first. ``best`` is the layer OCD should overfit.

    Example:
        >>> scores = select_layer(model, loader, loss_fn)  # doctest: +SKIP
        >>> scores.best, scores.second, scores.to_list()[:2]  # doctest: +SKIP
    """

    layers: list[LayerScore]
    perturbation: str
    draws: int
    samples: int
    seed: int
    seconds: float
    noise_scale: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = sorted(self.layers, key=lambda s: -s.score)  # stable: ties keep model order

    @property
    def best(self) -> str:
        """Name of the highest-scoring layer."""
        return self.layers[0].name

    @property
    def second(self) -> str | None:
        """Name of the second-ranked layer (the "alternative layer" ablation); None if only one."""
        return self.layers[1].name if len(self.layers) > 1 else None

    @property
    def ranking(self) -> list[tuple[str, float]]:
        """``[(name, score), ...]``, best first."""
        return [(s.name, s.score) for s in self.layers]

    @property
    def scores(self) -> dict[str, float]:
        """``{name: score}`` for every candidate."""
        return dict(self.ranking)

    def to_list(self) -> list[list[Any]]:
        """``[[name, score], ...]``, best first (JSON-friendly; stored in OCDConfig.layer_ranking)."""
        return [[s.name, s.score] for s in self.layers]

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-friendly."""
        return {
            "perturbation": self.perturbation,
            "draws": self.draws,
            "samples": self.samples,
            "seed": self.seed,
            "noise_scale": self.noise_scale,
            "seconds": self.seconds,
            "best": self.best,
            "layers": [
                {
                    "name": s.name,
                    "score": s.score,
                    "weight_shape": list(s.weight_shape),
                    "num_params": s.num_params,
                    "loss_std": s.loss_std,
                    "vectorized": s.vectorized,
                    "released_score": s.released_score,
                }
                for s in self.layers
            ],
        }

    def __str__(self) -> str:
        head = (
            f"Layer selection: {len(self.layers)} candidates, perturbation={self.perturbation!r}, "
            f"{self.draws} draws, {self.samples} samples, seed {self.seed}, {self.seconds:.2f} s\n\n"
            "| rank | layer | weight shape | params | mean loss std | score | variant score |\n"
            "| ---: | --- | --- | ---: | ---: | ---: | ---: |\n"
        )
        rows = [
            f"| {i} | {s.name} | {'x'.join(map(str, s.weight_shape))} | {s.num_params:,} | "
            f"{s.loss_std:.4g} | {s.score:.2f} | {s.released_score:.3f} |"
            for i, s in enumerate(self.layers, 1)
        ]
        return head + "\n".join(rows)

    __repr__ = __str__


# --- candidates --------------------------------------------------------------------------------
