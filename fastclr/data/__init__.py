"""Data path: sources (digits, folder, file list, tar shards, in-memory arrays) → one DALI pipeline per device →
torch batches. See :mod:`fastclr.data.loader` for order, sharding and resume, :mod:`fastclr.data.augment` for the
SimCLR augmentation."""
from .loader import EvalLoader, TrainLoader, build_eval_loader, build_train_loader
from .sources import (ArraySource, FileSource, Source, TarSource, build_source, digits_source, filelist_source,
                      folder_source, tar_source)

__all__ = ["build_train_loader", "build_eval_loader", "TrainLoader", "EvalLoader", "Source", "ArraySource",
           "FileSource", "TarSource", "build_source", "digits_source", "folder_source", "filelist_source",
           "tar_source"]
