"""The iterators the trainer and the evaluation use: DALI pipelines fed by a seeded, sharded sample order.

Order. Epoch ``e`` is a permutation of the whole source drawn from (seed, e); with k shards the first
``len(loader)·batch·k`` entries are dealt round-robin (shard s takes entries s, s+k, ...) and the tail is dropped,
so every shard has the same number of full batches and no sample appears twice in an epoch. The order is a pure
function of (seed, epoch, number of shards): ``set_epoch`` may jump to any epoch.

Stream. One DALI pipeline runs as an endless stream of batches across epoch ends (no rebuild, no bubble): DALI's
iteration counter maps to (epoch, position) through an anchor fixed when the pipeline is built. ``set_epoch`` to
where the stream already is keeps it; any other jump rebuilds the pipeline there (``load_state_dict`` rebuilds it
from the saved DALI checkpoint).

Resume granularity: one batch, exactly. ``state_dict`` records (epoch, position) and the DALI pipeline checkpoint
(the state of every random operator), so a loader restored from it yields the same order *and the same augmented
pixels* as the uninterrupted one. Without a usable pipeline checkpoint (another DALI version, changed augmentation
settings) the order is still exact and the augmentation stream restarts from a seed derived from
(seed, shard, epoch, position).

Bad samples. Every encoded sample passes :func:`fastclr.data.screen.screen` on the read thread before DALI sees it.
A bad one (undecodable, empty, not an image) is recorded in ``loader.bad`` (index → reason, its name in
``bad_files()``) and its slot is filled by a replacement drawn from (seed, shard, batch, slot): the batch keeps its
size, the run goes on, and the substitution is as deterministic as the order, so resume stays exact. A batch that
still makes the pipeline fail (a file that fools the screen) is decoded sample by sample, the culprits are marked and
the pipeline is rebuilt at the same batch (its augmentation stream then restarts from a derived seed).
"""
from __future__ import annotations

import hashlib
import math
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import nvidia.dali as dali
from nvidia.dali import types

from .augment import default_eval_resize, eval_graph, two_view_graph
from .screen import BadSamples, as_png, decodes, decodes_on_gpu
from .sources import Source, build_source

ORDER_STREAM = 0x5D1C
"""Mixed into the shuffle seed so the sample order is not correlated with other streams drawn from the same seed."""
EVAL_SUBSET_SEED = 1234
"""Fixed seed of the evaluation subset when ``max_images`` caps a split (independent of the run's seed)."""
REPLACE_STREAM = 0xBAD
"""Mixed into the seed of the replacements drawn for bad samples."""
MAX_REPLACEMENT_TRIES = 64
BUILD_LOCK = threading.Lock()
"""One DALI pipeline build at a time in this process (a build beside another one, or beside a pipeline being freed,
is the first suspect for a segfault seen once inside ``Pipeline.build``; see :mod:`fastclr.data.decoder`)."""
STAND_IN = np.frombuffer(b"P6\n1 1\n255\n\x00\x00\x00", np.uint8)
"""A valid 1×1 black image (binary PPM) standing in for a bad sample where no replacement may be drawn (evaluation:
the slot's label becomes -1 and the sample is left out of the metrics)."""


def _seed_from(*parts: int) -> int:
    """A 31-bit seed (DALI takes a signed int) that is a pure function of ``parts``."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def _dali_dtype(device: torch.device, dtype: torch.dtype):
    # fp16 can be produced by crop_mirror_normalize directly on the GPU (half the output traffic); bf16 has no DALI
    # output type, and on the CPU the fp32 → bf16/fp16 cast is one cheap pass in torch.
    return types.FLOAT16 if (device.type == "cuda" and dtype == torch.float16) else types.FLOAT


def _device_args(device: torch.device) -> tuple[str, int | None]:
    if device.type == "cuda":
        return "gpu", device.index if device.index is not None else torch.cuda.current_device()
    if device.type != "cpu":
        raise ValueError(f"device must be cpu or cuda, got '{device}'")
    return "cpu", None  # DALI CPU pipelines need device_id=None


def _stream(device: torch.device):
    """On the GPU: torch's current stream, which DALI then binds its outputs to — no host synchronization (without
    it ``pipe.run()`` returns host-synchronous outputs). None on the CPU."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None


def _to_torch(tensor_list, device: torch.device, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """A dense DALI batch → torch without a copy (DLPack; on the GPU it orders DALI's stream before torch's)."""
    t = tensor_list.as_tensor()
    if device.type == "cuda":
        with torch.cuda.device(device):
            x = torch.from_dlpack(t)
    else:
        x = torch.from_dlpack(t)
    if channels_last:
        x = x.permute(0, 3, 1, 2)  # (B, H, W, C) storage viewed as (B, C, H, W): channels_last strides, no copy
    return x if x.dtype == dtype else x.to(dtype)  # preserve_format keeps the NHWC strides


class TrainLoader:
    """Two-view SimCLR batches of one shard. ``for view_a, view_b in loader`` yields the rest of the current epoch;
    when that ends (or was already used up) the loader stands at the start of the next epoch."""

    graph = staticmethod(two_view_graph)
    """The DALI graph of a batch; a subclass swaps it with ``outputs`` (:mod:`fastclr.data.labelled`: one view and the
    labels)."""

    def __init__(self, source: Source, cfg, *, batch_size: int, shard_id: int = 0, num_shards: int = 1,
                 device: torch.device, dtype: torch.dtype = torch.float32, channels_last: bool = True,
                 batch_field: str = "train.global_batch_size"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_shards < 1 or not 0 <= shard_id < num_shards:
            raise ValueError(f"need 0 <= shard_id < num_shards, got shard_id={shard_id}, num_shards={num_shards}")
        self.source, self.cfg = source, cfg
        self.batch_size, self.shard_id, self.num_shards = batch_size, shard_id, num_shards
        self.device, self.dtype, self.channels_last = torch.device(device), dtype, channels_last
        self._dali_device, self._device_id = _device_args(self.device)
        self._batches = len(source) // num_shards // batch_size
        if self._batches < 1:
            raise ValueError(f"batch size {batch_size} × {num_shards} shard(s) is more than the {len(source)} samples "
                             f"of {source.name}: lower the batch size ({batch_field})")
        self.epoch, self.position = 0, 0
        self._pipe = None
        self._pipe_g0 = 0        # global batch of the pipeline's first output after the build (or restore)
        self._pipe_next = 0      # global batch (epoch·len + position) the pipeline's next output belongs to
        self._pipe_iter0 = 0     # DALI iteration of the pipeline's first output after the build (or restore)
        self._pipe_runs = 0      # outputs taken from it since then
        self._pipe_seed = 0
        self._restore = None     # a DALI checkpoint to build the next pipeline from
        self._orders: dict[int, np.ndarray] = {}
        self._ahead: dict[int, object] = {}
        self._reader = ThreadPoolExecutor(max_workers=1) if source.encoded else None
        self.bad = BadSamples(source)
        self.reencoded: dict[int, np.ndarray] = {}  # images the GPU decoder refuses, as PNG (see _blame)

    # ---------------------------------------------------------------------------------------------------------- #
    def __len__(self) -> int:
        """Batches per epoch on this shard (the incomplete last batch is dropped)."""
        return self._batches

    @property
    def num_samples(self) -> int:
        """Samples used per epoch over all shards."""
        return self._batches * self.batch_size * self.num_shards

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(len, batch_size) source indices of this shard's batches in ``epoch``."""
        order = self._orders.get(epoch)
        if order is None:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.cfg.seed, epoch, ORDER_STREAM])))
            perm = rng.permutation(len(self.source))[: self.num_samples]
            order = perm[self.shard_id:: self.num_shards].reshape(self._batches, self.batch_size)
            if len(self.source) < 2 ** 31:  # 4 bytes per sample, not 8: at 1.28M images a rank keeps two epochs
                order = order.astype(np.int32)
            # Keep this epoch and the previous one; a new dict (not an update) because the read-ahead thread reads
            # this cache too.
            previous = self._orders.get(epoch - 1)
            self._orders = {epoch: order} if previous is None else {epoch - 1: previous, epoch: order}
        return order

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch at the next iteration."""
        self.epoch, self.position = int(epoch), 0
        self._sync()

    def _global(self) -> int:
        return self.epoch * self._batches + self.position

    def _sync(self) -> None:
        """Drop the pipeline if its next output is not the batch the loader must yield next."""
        if self._pipe is not None and self._pipe_next != self._global():
            self._drop_pipe()

    # ---------------------------------------------------------------------------------------------------------- #
    def _read(self, g: int):
        return self._resolve(g)[1]

    def _resolve(self, g: int) -> tuple[list[int], list]:
        """(source index that fills each slot, sample) of global batch ``g``: bad samples replaced."""
        epoch, pos = divmod(g, self._batches)
        indices = [int(i) for i in self.epoch_order(epoch)[pos]]
        samples = self.source.read(np.asarray(indices))
        if not self.source.encoded:
            return indices, samples  # decoded arrays cannot be bad
        samples = list(samples)
        for slot, i in enumerate(indices):
            if not self.bad.check(i, samples[slot]):
                indices[slot], samples[slot] = self._replacement(g, slot)
            elif indices[slot] in self.reencoded:
                samples[slot] = self.reencoded[indices[slot]]
        return indices, samples

    def _replacement(self, g: int, slot: int) -> tuple[int, np.ndarray]:
        """A good sample for slot ``slot`` of global batch ``g``, a pure function of (seed, shard, g, slot)."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
            [self.cfg.seed, self.shard_id, g, slot, REPLACE_STREAM])))
        for _ in range(MAX_REPLACEMENT_TRIES):
            j = int(rng.integers(len(self.source)))
            buf = self.source.read(np.array([j]))[0]
            if self.bad.check(j, buf):
                return j, buf
        raise RuntimeError(f"{self.source.name}: {MAX_REPLACEMENT_TRIES} random samples in a row are bad images "
                           f"({len(self.bad.bad)} bad found so far, e.g. {self.bad.names()[:3]}); check the dataset "
                           "with `fastclr data check`")

    def _blame(self, first: int, count: int) -> int:
        """Decode global batches first .. first+count-1 sample by sample; mark the samples that fail. Returns how
        many were found."""
        found = 0
        for g in range(first, first + count):
            indices, samples = self._resolve(g)
            for i, buf in zip(indices, samples):
                reason = decodes(buf)
                if reason is not None:
                    self.bad.mark(i, reason)
                    found += 1
                elif self._device_id is not None and decodes_on_gpu(buf, self._device_id) is not None:
                    # Good to the CPU decoder, refused by the GPU one: the same pixels as PNG, which it takes.
                    self.reencoded[i] = as_png(buf)
                    found += 1
        return found

    def _read_batch(self, info):
        """DALI's external-source callback: batch of DALI iteration ``info.iteration``."""
        g = self._pipe_g0 + info.iteration - self._pipe_iter0
        fut = self._ahead.pop(g, None)
        batch = fut.result() if fut is not None else self._read(g)
        if self._reader is not None:
            # File reads release the GIL: fetch the next batch's bytes on a thread while the step runs.
            self._ahead = {g + 1: self._reader.submit(self._read, g + 1)}
        return batch

    def _fingerprint(self) -> str:
        """What a DALI checkpoint depends on: the graph and the stream mapping."""
        c = self.cfg
        key = repr((dali.__version__, c.augment, c.image_size, c.seed, len(self.source), self.source.encoded,
                    self.batch_size, self.shard_id, self.num_shards, self._dali_device,
                    _dali_dtype(self.device, self.dtype), self.channels_last))
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def _build_pipe(self) -> None:
        g0 = self._global()
        restore, self._restore = self._restore, None
        if restore is not None:
            seed, iter0, checkpoint = restore["seed"], restore["iteration"], restore["checkpoint"]
        else:
            seed, iter0, checkpoint = _seed_from(self.cfg.seed, self.shard_id, g0), 0, None
        self._pipe_g0, self._pipe_iter0, self._pipe_next, self._pipe_runs, self._pipe_seed = g0, iter0, g0, 0, seed
        self._ahead = {}
        kw = {} if checkpoint is None else {"checkpoint": checkpoint}
        self._pipe = self.graph(
            read_batch=self._read_batch, encoded=self.source.encoded, aug=self.cfg.augment,
            image_size=self.cfg.image_size, device=self._dali_device, dtype=_dali_dtype(self.device, self.dtype),
            channels_last=self.channels_last, batch_size=self.batch_size, num_threads=self.cfg.num_threads,
            device_id=self._device_id, seed=seed, prefetch_queue_depth=self.cfg.prefetch,
            enable_conditionals=self.cfg.augment.blur_p > 0, enable_checkpointing=True, **kw)
        with BUILD_LOCK:
            self._pipe.build()

    def _drop_pipe(self) -> None:
        self._pipe = None  # DALI stops its worker threads when the pipeline is garbage-collected
        self._ahead = {}

    def __iter__(self):
        """The rest of the current epoch (nothing if it is used up), then the loader moves on to the next epoch."""
        while self.position < self._batches:
            if self._pipe is None:
                self._build_pipe()
            try:
                outputs = self._pipe.run(_stream(self.device))
            except RuntimeError:
                # The batches in flight: this one and those DALI read ahead of it.
                if not self.source.encoded or not self._blame(self._global(), self.cfg.prefetch + 1):
                    raise
                self._drop_pipe()  # rebuilt at the same batch, now without the culprits
                continue
            self._pipe_runs += 1
            self._pipe_next += 1
            self.position += 1
            yield self.outputs(outputs)
        self.epoch, self.position = self.epoch + 1, 0

    def outputs(self, outputs) -> tuple[torch.Tensor, ...]:
        """The torch batch of one pipeline run: (view_a, view_b)."""
        return tuple(_to_torch(o, self.device, self.dtype, self.channels_last) for o in outputs)

    # ---------------------------------------------------------------------------------------------------------- #
    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "position": self.position, "batch_size": self.batch_size,
                 "num_shards": self.num_shards, "shard_id": self.shard_id, "dataset_size": len(self.source),
                 "seed": self.cfg.seed}
        if self._pipe is not None:
            state["pipeline"] = {"checkpoint": self._pipe.checkpoint(), "iteration": self._pipe_iter0 + self._pipe_runs,
                                 "seed": self._pipe_seed, "fingerprint": self._fingerprint()}
        elif self._restore is not None:  # restored but not run yet: hand the pending stream state on unchanged
            state["pipeline"] = dict(self._restore)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``'s epoch and position; the same augmentation stream if its pipeline state fits."""
        for key, mine in (("batch_size", self.batch_size), ("num_shards", self.num_shards),
                          ("dataset_size", len(self.source))):
            if key in state and state[key] != mine:
                raise ValueError(f"loader state was saved with {key} {state[key]}, this loader has {mine}: the "
                                 "position cannot be carried over; call set_epoch() to start the epoch afresh")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._drop_pipe()
        self._restore = None
        pipe_state = state.get("pipeline")
        if pipe_state is not None:
            if pipe_state.get("fingerprint") == self._fingerprint():
                self._restore = pipe_state
            else:
                warnings.warn("loader state: the saved augmentation stream does not fit this loader (settings "
                              "changed); the sample order resumes exactly, the random augmentations restart")

    def close(self) -> None:
        self._drop_pipe()
        if self._reader is not None:
            self._reader.shutdown(wait=False, cancel_futures=True)


class EvalLoader:
    """Deterministic (images, labels) batches of a split in source order (shard s of k: every k-th image from the
    s-th, so that the shards interleave back into the split); the last batch may be short."""

    def __init__(self, source: Source, cfg, *, batch_size: int, device: torch.device,
                 dtype: torch.dtype = torch.float32, channels_last: bool = True, max_images: int = 0,
                 shard_id: int = 0, num_shards: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_images < 0:
            raise ValueError(f"max_images must be >= 0, got {max_images}")
        self.source, self.cfg, self.batch_size = source, cfg, batch_size
        self.device, self.dtype, self.channels_last = torch.device(device), dtype, channels_last
        self._dali_device, self._device_id = _device_args(self.device)
        self.indices = np.arange(len(source))
        if 0 < max_images < len(source):
            # A fixed random subset, not the first images: class folders are listed class by class.
            rng = np.random.Generator(np.random.PCG64(EVAL_SUBSET_SEED))
            self.indices = np.sort(rng.choice(len(source), max_images, replace=False))
        self.split_size = len(self.indices)
        self.indices = self.indices[shard_id::num_shards]
        self.labels = torch.from_numpy(source.labels[self.indices])
        self.bad = BadSamples(source)

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    def _read_batch(self, info):
        start = info.iteration * self.batch_size
        if start >= len(self.indices):
            raise StopIteration  # DALI's end-of-data signal; every batch before it is still delivered
        indices = self.indices[start:start + self.batch_size]
        samples = self.source.read(indices)
        if self.source.encoded:
            samples = [buf if self.bad.check(int(i), buf) else STAND_IN for i, buf in zip(indices, samples)]
        return samples

    def __iter__(self):
        # A fresh pipeline per pass (a few milliseconds): a pass abandoned half-way leaves nothing behind.
        pipe = eval_graph(
            read_batch=self._read_batch, encoded=self.source.encoded, aug=self.cfg.augment,
            image_size=self.cfg.eval_size, resize_to=default_eval_resize(self.cfg.eval_size, self.cfg.eval_resize),
            device=self._dali_device, dtype=_dali_dtype(self.device, self.dtype), channels_last=self.channels_last,
            batch_size=self.batch_size, num_threads=self.cfg.num_threads, device_id=self._device_id, seed=0,
            prefetch_queue_depth=self.cfg.prefetch)
        with BUILD_LOCK:
            pipe.build()
        for b in range(len(self)):
            (images,) = pipe.run(_stream(self.device))
            labels = self.labels[b * self.batch_size:(b + 1) * self.batch_size]
            if self.bad.bad:  # the callback of batch b has run: its bad samples are known; -1 leaves them out
                index = self.indices[b * self.batch_size:(b + 1) * self.batch_size]
                labels = labels.masked_fill(torch.from_numpy(np.isin(index, list(self.bad.bad))), -1)
            yield (_to_torch(images, self.device, self.dtype, self.channels_last),
                   labels.to(self.device, non_blocking=True))


def build_train_loader(cfg, *, batch_size: int, shard_id: int = 0, num_shards: int = 1, device: torch.device,
                       dtype: torch.dtype = torch.float32, channels_last: bool = True) -> TrainLoader:
    """The training loader of ``cfg`` (a :class:`fastclr.config.DataConfig`) for one shard (rank)."""
    return TrainLoader(build_source(cfg, "train"), cfg, batch_size=batch_size, shard_id=shard_id,
                       num_shards=num_shards, device=device, dtype=dtype, channels_last=channels_last)


def build_eval_loader(cfg, split: str, *, batch_size: int, device: torch.device, dtype: torch.dtype = torch.float32,
                      channels_last: bool = True, max_images: int = 0, shard_id: int = 0,
                      num_shards: int = 1) -> EvalLoader:
    """Evaluation loader: 'train' = the training set without augmentation (kNN bank, linear probe), 'test' = the
    held-out split."""
    return EvalLoader(build_source(cfg, split, cfg.eval_size), cfg, batch_size=batch_size, device=device, dtype=dtype,
                      channels_last=channels_last, max_images=max_images, shard_id=shard_id, num_shards=num_shards)
