"""``ocdwrap.compare``: OCD against every control on one model, as one resumable call.

``compare(model, train_data, eval_data, loss_fn, out_dir=...)`` returns a :class:`Comparison`
(rows, table, verdict, plot); docs/compare.md describes the rows and how to read it.
"""

from .report import Comparison, Metric, Row
from .run import ROWS, compare

__all__ = ["ROWS", "Comparison", "Metric", "Row", "compare"]
