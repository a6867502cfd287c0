"""Reading networks back from what runs write and users download — safely (writing them: :mod:`fastclr.export`).

A source is one of: a checkpoint folder (``<checkpoint.dir>/stepNNNNNNNNN``, sealed with its ``COMPLETE`` marker, a
preempted run's included), a ``checkpoint.dir`` (its newest complete checkpoint), an exported backbone
(``backbone.pt`` / ``backbone.safetensors``) or a fine-tuned or distilled network (``classifier.pt``). Every file is
read with ``torch.load(..., weights_only=True)`` or safetensors: tensors, numbers, strings and containers only, so
a file crafted to run code when unpickled (``__reduce__``) is refused with :class:`UnsafeFileError` instead of
executed. The config of the run that made the weights comes from the checkpoint marker, the safetensors metadata,
the classifier file, or the ``config.yaml`` a run writes next to ``backbone.pt``.
"""
from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field

import torch

from .checkpoint import COMPLETE, complete_tags, read_meta

MODEL_STATES = "mp_rank_00_model_states.pt"
"""DeepSpeed's file of the module's state (with ZeRO 0 every rank's copy is the same; rank 0 writes it)."""
CLASSIFIER_FORMAT = "fastclr-classifier"
META_KEY = "fastclr"
"""The safetensors metadata entry holding {"kind", "config", ...} as JSON."""
BACKBONE_PREFIX = "backbone."
NON_BACKBONE_PREFIXES = ("head.", "fc.")


def strip_wrappers(key: str) -> str:
    """Drop what wrappers add to a key: DDP/DeepSpeed's leading ``module.``, torch.compile's ``_orig_mod.``."""
    key = key.replace("_orig_mod.", "")
    while key.startswith("module."):
        key = key[len("module."):]
    return key


class UnsafeFileError(ValueError):
    """A file holds more than tensors and plain containers: loading it would run code from it."""


@dataclass
class Weights:
    kind: str
    """'checkpoint' (backbone.* and head.* of a pretraining run), 'backbone' or 'classifier'."""
    state: dict[str, torch.Tensor]
    config: dict | None
    """The config tree (as a dict) of the run that made the weights, where known."""
    path: str
    meta: dict = field(default_factory=dict)
    """classifier: num_classes, head_layers, labels, top1 ...; checkpoint: the marker (step, world_size, ...)."""

    def backbone(self) -> dict[str, torch.Tensor]:
        """The backbone tensors under torchvision's names (no prefix)."""
        if self.kind == "backbone":
            return dict(self.state)
        return {k[len("backbone."):]: v for k, v in self.state.items() if k.startswith("backbone.")}

    def head(self) -> dict[str, torch.Tensor]:
        """The projection head's (checkpoint) or the kept head layers' (classifier) tensors, as ``mlp.*``."""
        return {k[len("head."):]: v for k, v in self.state.items() if k.startswith("head.")}


def load_file(path: str) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU; :class:`UnsafeFileError` for a file that needs more."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeFileError(
            f"refusing to load '{path}': it holds Python objects that only a full unpickle can build, and a full "
            f"unpickle can run code from the file ({first}). fastclr reads tensors only (torch.load weights_only=True, "
            "or safetensors); export the weights as a plain state_dict or safetensors file") from None


def _safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file as st_load, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        return st_load(path), json.loads(meta.get(META_KEY, "{}"))
    except (SafetensorError, json.JSONDecodeError, OSError) as e:
        raise ValueError(f"'{path}' is not a readable safetensors file ({e})") from None


def checkpoint_folder(path: str) -> str | None:
    """The complete checkpoint ``path`` names: itself (a sealed step folder) or the newest in a checkpoint.dir."""
    if os.path.isfile(os.path.join(path, COMPLETE)):
        return path
    tags = complete_tags(path)
    return os.path.join(path, tags[-1][1]) if tags else None


def _config_beside(path: str) -> dict | None:
    """The ``config.yaml`` a run writes next to ``backbone.pt``, as a dict (safe YAML)."""
    import yaml

    beside = os.path.join(os.path.dirname(os.path.abspath(path)), "config.yaml")
    if not os.path.isfile(beside):
        return None
    with open(beside) as f:
        raw = yaml.safe_load(f)
    return raw if isinstance(raw, dict) else None


def _tensors_only(obj, path: str) -> dict[str, torch.Tensor]:
    if not (isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in obj.items())):
        raise ValueError(f"'{path}' is not a state_dict (a mapping of names to tensors) nor a fastclr classifier file")
    return obj


def load_weights(path: str) -> Weights:
    """The weights and config at ``path`` (see the module docstring for what ``path`` may be); fails naming it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"'{path}' does not exist (give a checkpoint folder, a checkpoint.dir, backbone.pt, "
                                "backbone.safetensors or classifier.pt)")
    if os.path.isdir(path):
        folder = checkpoint_folder(path)
        if folder is None:
            raise FileNotFoundError(f"'{path}' holds no complete checkpoint (no {COMPLETE} marker in it or in a "
                                    "step folder under it)")
        meta = read_meta((os.path.dirname(folder), os.path.basename(folder)))
        states = os.path.join(folder, MODEL_STATES)
        if not os.path.isfile(states):
            raise FileNotFoundError(f"checkpoint '{folder}' has no {MODEL_STATES}")
        module = load_file(states)
        module = module.get("module") if isinstance(module, dict) else None
        state = {strip_wrappers(k): v for k, v in _tensors_only(module, states).items()}
        meta.pop("files", None)
        return Weights("checkpoint", state, meta.get("config"), folder, meta)
    if path.endswith(".safetensors"):
        state, meta = _safetensors(path)
        return Weights(meta.get("kind", "backbone"), state, meta.get("config") or _config_beside(path), path, meta)
    obj = load_file(path)
    if isinstance(obj, dict) and obj.get("format") == CLASSIFIER_FORMAT:
        meta = {k: v for k, v in obj.items() if k not in ("state_dict", "config")}
        return Weights("classifier", _tensors_only(obj.get("state_dict"), path), obj.get("config"), path, meta)
    state = {strip_wrappers(k): v for k, v in _tensors_only(obj, path).items()}
    if any(k.startswith("backbone.") for k in state):  # a whole SimCLR model's state_dict
        return Weights("checkpoint", state, _config_beside(path), path)
    return Weights("backbone", state, _config_beside(path), path)
