"""Saving and loading an adapter: the files of :meth:`OCDModel.save_pretrained` and
:meth:`OCDModel.from_pretrained` (a local directory or a Hugging Face Hub repository).

An adapter is ``ocd_config.json`` (:class:`~ocdwrap.OCDConfig`), ``ocd_sampling.json``
(:class:`~ocdwrap.SamplingConfig`), ``ocd_model.safetensors`` (the hypernetwork), a ``README.md``
model card and ``ocd_files.json``, the commit point naming them with their checksums; never the
base model and never pickle. An adapter written by ocdwrap 0.1.0 (one flat ``ocd_config.json``,
no ``ocd_sampling.json``) loads with its settings read into their homes.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import torch
from safetensors.torch import save as safetensors_save
from torch import nn

from .card import CARD_NAME, model_card
from .card import is_ours as card_is_ours
from .config import OCDConfig, SamplingConfig, split_legacy
from .errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    BaseModelMismatchError,
    CorruptFileError,
    LayerNotFoundError,
    UnsupportedLayerError,
)
from .hypernet import OCDHyperNetwork
from .io import (
    ADAPTER_FILES_NAME,
    CONFIG_NAME,
    SAMPLING_NAME,
    WEIGHTS_NAME,
    json_from_bytes,
    read_file_set,
    safetensors_metadata,
    tensors_from_bytes,
    write_file_set,
)

logger = logging.getLogger("ocdwrap")


def save_adapter(model: Any, directory: str | os.PathLike, *, overwrite: bool = False) -> str:
    """:meth:`OCDModel.save_pretrained`: write ``model``'s adapter into ``directory``."""
    hypernet = model._require_hypernet()
    directory = os.fspath(directory)
    if not overwrite and any(
        os.path.exists(os.path.join(directory, f))
        for f in (WEIGHTS_NAME, CONFIG_NAME, ADAPTER_FILES_NAME)
    ):
        raise AdapterExistsError(
            f"{directory} already holds an OCD adapter; pass overwrite=True to replace it, or choose "
            "another directory."
        )
    meta = {
        "format": "ocdwrap-adapter",
        "layer": model.layer_name,
        "fingerprint": model.layer_fingerprint(),
        "hypernet": json.dumps(hypernet.spec()),
    }
    state = {k: v.detach().contiguous().cpu() for k, v in hypernet.state_dict().items()}
    from . import __version__

    config = model.config.replace(library_version=__version__)
    files = {
        WEIGHTS_NAME: safetensors_save(state, metadata=meta),
        CONFIG_NAME: config.to_json_string().encode("utf-8"),
        SAMPLING_NAME: model.sampling_config.to_json_string().encode("utf-8"),
    }
    readme = os.path.join(directory, CARD_NAME)
    if not os.path.exists(readme) or card_is_ours(readme):
        files[CARD_NAME] = model_card(model, __version__).encode("utf-8")
    else:
        logger.warning(
            "ocdwrap: %s is not an ocdwrap model card; it was left as it is and no card was "
            "written.",
            readme,
        )
    write_file_set(directory, files, fmt="ocdwrap-adapter")
    return directory


def load_adapter(
    cls: type,
    base: nn.Module,
    directory: str | os.PathLike,
    device: str | torch.device | None = None,
    is_trainable: bool = False,
    **hub: Any,
) -> Any:
    """:meth:`OCDModel.from_pretrained`: ``base`` wrapped by ``cls`` with the adapter loaded."""
    directory = _adapter_directory(os.fspath(directory), **hub)
    _require_adapter_files(directory)
    path = os.path.join(directory, WEIGHTS_NAME)
    files, _ = read_file_set(
        directory,
        [CONFIG_NAME, WEIGHTS_NAME],
        what=f"The adapter in {directory} cannot be used; save it again with "
        "OCDModel.save_pretrained (or restore it from a backup).",
        optional=(SAMPLING_NAME,),
    )
    config_path = os.path.join(directory, CONFIG_NAME)
    stored = json_from_bytes(files[CONFIG_NAME], config_path)
    config = OCDConfig.from_dict(stored)
    if SAMPLING_NAME in files:
        where = os.path.join(directory, SAMPLING_NAME)
        sampling = SamplingConfig.from_dict(json_from_bytes(files[SAMPLING_NAME], where))
    else:  # saved by 0.1.0: the sampling defaults were fields of ocd_config.json
        sampling = SamplingConfig.from_dict(split_legacy(stored)["SamplingConfig"])
    state = tensors_from_bytes(files[WEIGHTS_NAME], path)
    meta = safetensors_metadata(files[WEIGHTS_NAME], path)
    if meta.get("format") != "ocdwrap-adapter" or not {"hypernet", "layer"} <= set(meta):
        raise CorruptFileError(
            f"{path} is not an ocdwrap adapter (its metadata lacks the ocdwrap format stamp); "
            "save the adapter again with OCDModel.save_pretrained."
        )
    try:
        model = cls(base, meta["layer"], config, sampling)
    except (LayerNotFoundError, UnsupportedLayerError) as e:
        raise BaseModelMismatchError(
            f"The adapter in {directory} was fitted on layer {meta['layer']!r}, which this base model "
            f"cannot provide: {e} Load it onto the base model it was fitted on."
        ) from e
    found = model.layer_fingerprint()
    if found != meta["fingerprint"]:
        model.unload()
        raise BaseModelMismatchError(
            f"The adapter in {directory} was fitted on a different base model: layer {meta['layer']!r} "
            f"has fingerprint {found}, the adapter expects {meta['fingerprint']}. Load it onto the "
            "base model it was fitted on."
        )
    try:
        hypernet = OCDHyperNetwork.from_spec(config, json.loads(meta["hypernet"]))
        hypernet.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        model.unload()
        raise CorruptFileError(
            f"The adapter in {directory} is damaged: its weights do not match its own description "
            f"({e}). Save it again with OCDModel.save_pretrained."
        ) from e
    model.hypernet = hypernet.to(device or model.device).eval()
    model.is_trainable = bool(is_trainable)
    return model


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _adapter_directory(name: str, **hub: Any) -> str:
    """``name`` itself when it is a local directory, else the snapshot of the Hub repo it names."""
    if os.path.exists(name) or not _HUB_ID.fullmatch(name):  # ./x, ~/x, /x, a/b/c: local
        return name  # a local path (a missing one is reported by _require_adapter_files)
    from huggingface_hub import snapshot_download

    files = [CONFIG_NAME, WEIGHTS_NAME, SAMPLING_NAME, ADAPTER_FILES_NAME, "README.md"]
    try:
        return snapshot_download(name, allow_patterns=files, **hub)
    except Exception as e:  # offline, not found, no access: one error that names both readings
        raise AdapterNotFoundError(
            f"No OCD adapter to load: there is no directory {name!r} here, and the Hugging Face "
            f"Hub repository {name!r} could not be fetched ({type(e).__name__}: {e}). Pass the "
            "directory save_pretrained wrote, or a Hub repo id that holds one (online, or in "
            "the local cache with local_files_only=True)."
        ) from e


def _require_adapter_files(directory: str) -> None:
    """An :class:`AdapterNotFoundError` naming what is missing, before anything is read."""
    if os.path.exists(os.path.join(directory, ADAPTER_FILES_NAME)):
        return  # the commit point names the files; reading checks each of them
    missing = [
        f for f in (CONFIG_NAME, WEIGHTS_NAME) if not os.path.exists(os.path.join(directory, f))
    ]
    if not missing:
        return
    if not os.path.isdir(directory):
        where = f"{directory} does not exist"
    else:
        where = f"{directory} lacks {' and '.join(missing)}"
    raise AdapterNotFoundError(
        f"No OCD adapter to load: {where}. Pass the directory that OCDModel.save_pretrained wrote "
        f"(it holds {CONFIG_NAME} and {WEIGHTS_NAME}), or save the adapter again."
    )
