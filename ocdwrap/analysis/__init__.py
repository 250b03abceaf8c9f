"""Analysis of a fitted OCD model: uncertainty studies and figures.

* :mod:`ocdwrap.analysis.uncertainty`: does the spread between draws flag wrong predictions
  (AUROC against the base model's own confidence, calibration, reliability bins)?
* :mod:`ocdwrap.analysis.plots`: figures of layer scores, fit curves, deltas and results;
  needs the ``[plots]`` extra (matplotlib), imported only when a figure is drawn.
"""
