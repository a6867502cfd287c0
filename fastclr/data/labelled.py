"""(images, labels) batches for supervised training after pretraining: one augmented view per image.

The augmentation of the linear protocol, fine-tuning and distillation (Chen et al. 2020, appendix B.5–B.6; 2020b,
sec. 4: "only random crop and horizontal flips"): random resized crop, horizontal flip, normalize — the SimCLR graph
of :mod:`fastclr.data.augment` with colour distortion and blur switched off. Everything else is the pretraining
loader's: a seeded permutation per epoch dealt round-robin to the shards, bad images replaced deterministically, an
endless DALI stream and exact resume (:class:`fastclr.data.loader.TrainLoader`). The labels travel through the
pipeline next to their images (a second output of the external source), so DALI's read-ahead cannot misalign them,
and on a GPU they arrive on the device without a host copy in the step.
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from .augment import normalize, random_view
from .loader import TrainLoader, _to_torch
from .sources import Source


def supervised_augment(aug, crop_area: tuple[float, float]):
    """``aug`` (an AugmentConfig) reduced to crop + flip: no colour jitter, grayscale or blur; crop area
    ``crop_area``. Normalization statistics stay the pretraining's, as the network expects."""
    return dataclasses.replace(aug, crop_area=tuple(crop_area), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


@pipeline_def
def labelled_graph(read_batch, encoded: bool, aug, image_size: int, device: str, dtype, channels_last: bool):
    """Decode, one random view, normalize: outputs (view, labels (B, 1) int64)."""
    images, labels = fn.external_source(source=read_batch, num_outputs=2, batch=True, batch_info=True,
                                        dtype=[types.UINT8, types.INT64], ndim=[1 if encoded else 3, 1])
    if encoded:
        images = fn.decoders.image(images, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
    elif device == "gpu":
        images = images.gpu()
    view, flip = random_view(images, aug, image_size, device=device)
    if device == "gpu":
        labels = labels.gpu()
    return normalize(view, aug, dtype=dtype, channels_last=channels_last, mirror=flip), labels


class LabelledLoader(TrainLoader):
    """``for images, labels in loader``: the rest of the epoch of one shard, labels (B,) int64 on the device
    (-1 where the source has none: the unlabelled samples of a distillation set)."""

    graph = staticmethod(labelled_graph)

    def _read(self, g: int):
        indices, samples = self._resolve(g)
        labels = self.source.labels[np.asarray(indices)].reshape(-1, 1)  # (B, 1): a batch of 1-element samples
        return samples, labels

    def outputs(self, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = outputs
        x = _to_torch(images, self.device, self.dtype, self.channels_last)  # (B, 3, S, S)
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                y = torch.from_dlpack(labels.as_tensor())
        else:
            y = torch.from_dlpack(labels.as_tensor())
        return x, y.view(-1)  # (B,)


def with_labels(source: Source, labels: np.ndarray) -> Source:
    """``source`` with its labels replaced (the samples are shared, not copied)."""
    labels = np.asarray(labels, np.int64)
    if labels.shape != (len(source),):
        raise ValueError(f"{source.name}: need {len(source)} labels, got shape {labels.shape}")
    out = copy.copy(source)  # shallow: every source keeps its samples in per-instance attributes
    out.labels = labels
    return out


def build_labelled_loader(data_cfg, source: Source, *, crop_area: tuple[float, float], batch_size: int,
                          shard_id: int = 0, num_shards: int = 1, device: torch.device,
                          dtype: torch.dtype = torch.float32, channels_last: bool = True,
                          batch_field: str = "train.global_batch_size") -> LabelledLoader:
    """The supervised loader of ``source`` with ``data_cfg``'s image size, threads, seed and normalization (a
    :class:`fastclr.config.DataConfig`) and crop + flip augmentation."""
    cfg = dataclasses.replace(data_cfg, augment=supervised_augment(data_cfg.augment, crop_area))
    return LabelledLoader(source, cfg, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards,
                          device=device, dtype=dtype, channels_last=channels_last, batch_field=batch_field)
