"""The exceptions ocdwrap raises.

Every error derives from :class:`OCDError`, and also from the built-in type a user would
naturally catch (``ValueError``, ``TypeError``, ``RuntimeError``, ``FileExistsError``), so
``except ValueError`` keeps working in code that does not know about ocdwrap.
Messages name the problem and the fix.
"""

from __future__ import annotations


class OCDError(Exception):
    """Base class of every ocdwrap error."""


class LayerNotFoundError(OCDError, ValueError):
    """The named target layer does not exist in the base model."""


class UnsupportedLayerError(OCDError, TypeError):
    """The target layer is of a type ocdwrap cannot make dynamic."""


class LayerReachError(OCDError, RuntimeError):
    """The target layer is never reached, or reached more than once, in one forward pass."""


class CalibrationRequiredError(OCDError, ValueError):
    """``layer="auto"`` was asked for without calibration data."""


class EmptyDataError(OCDError, ValueError):
    """A data loader yielded no samples."""


class BatchFormatError(OCDError, ValueError):
    """A batch does not have a form ocdwrap understands (for example, no labels)."""


class LossShapeError(OCDError, ValueError):
    """The loss function does not return per-sample losses (or their sum)."""


class DeviceDtypeError(OCDError, ValueError, RuntimeError):
    """Inputs are on another device, or of a dtype the model cannot take.

    Also a ``RuntimeError``: it replaces the ``RuntimeError`` torch raises for such inputs, so
    code that caught that keeps working.
    """


class NonFiniteError(OCDError, FloatingPointError):
    """NaN or Inf appeared in inputs, losses or deltas."""


class NotFittedError(OCDError, RuntimeError):
    """Generation was asked for before the hypernetwork was fitted or loaded."""


class BaseModelMismatchError(OCDError, ValueError):
    """An adapter or collection belongs to a different base model or configuration."""


class CorruptFileError(OCDError, ValueError):
    """A stored file (safetensors shard, manifest, checkpoint, adapter) is truncated or corrupted."""


class CollectionExistsError(OCDError, FileExistsError):
    """The output directory already holds a different collection."""


class AdapterExistsError(OCDError, FileExistsError):
    """The target directory already holds a saved adapter (pass overwrite=True to replace it)."""


class ConfigError(OCDError, ValueError):
    """A configuration value is invalid."""


class DistributedError(OCDError, RuntimeError):
    """A multi-process collection or fit failed on some process, or the processes disagree."""


class AdapterNotFoundError(OCDError, FileNotFoundError):
    """A directory holds no saved adapter (or only part of one)."""


class NotWrappedError(OCDError, TypeError):
    """A function that needs a wrapped model (e.g. ``headroom``) was given a plain module instead of a wrapped :class:`OCDModel`."""


class LabelMismatchError(OCDError, ValueError):
    """The loader's labels do not fit the loss function (or the task)."""


class ProbeFitError(OCDError, ValueError):
    """The probe of the label cannot be fitted on the data given (e.g. a single class)."""


class CollectionNotFoundError(OCDError, FileNotFoundError):
    """A directory holds no delta collection (no manifest)."""


class CollectionBusyError(OCDError, RuntimeError):
    """Another process is collecting into the same directory right now."""


class ComparisonExistsError(OCDError, FileExistsError):
    """The output directory holds a comparison made with other data, model or settings."""


class RowFailedError(OCDError, RuntimeError):
    """A row of ``ocdwrap.compare`` could not be computed (the rows done before it are kept)."""
