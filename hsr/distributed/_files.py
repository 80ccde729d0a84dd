"""Per-rank files of sharded indexes: ``<path>/shard-<rank>-of-<world>/`` holds ``meta.json``
(format, rank, world, start, shape) and the shard's indexes (:meth:`hsr.HSRIndex.save`: no
pickle) and values (``.npy``, loaded with ``allow_pickle=False``). A rank writes and reads its
own folder only."""

from __future__ import annotations

import json
import os

import numpy as np

from .._typing import StrPath
from ..attention.kv import KVCacheIndex, KVIndex
from ..index import HSRIndex

__all__ = ["shard_dir", "save_kv", "load_kv", "save_index", "load_index", "load_shard"]

_FORMAT = "hsr-shard"


def shard_dir(path, rank: int, world: int) -> str:
    """The folder of ``rank``'s shard under ``path``."""
    return os.path.join(os.fspath(path), f"shard-{rank:04d}-of-{world:04d}")


def _write_meta(folder, **meta):
    with open(os.path.join(folder, "meta.json"), "w") as fh:
        json.dump({"format": _FORMAT, "version": 1, **meta}, fh)


def _read_meta(folder, rank, world, kinds):
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"no shard of rank {rank} of {world} at {folder} (saved with another world size?)")
    with open(meta_path) as fh:
        meta = json.load(fh)
    if meta.get("format") != _FORMAT or meta.get("kind") not in kinds:
        raise ValueError(f"{folder} holds no hsr shard of kind {kinds} (meta: {meta})")
    if meta.get("rank") != rank or meta.get("world") != world:
        raise ValueError(f"{folder} was saved by rank {meta.get('rank')} of {meta.get('world')}, "
                         f"not rank {rank} of {world}")
    return meta


def save_kv(path, local, rank, world, start) -> None:
    folder = shard_dir(path, rank, world)
    os.makedirs(folder, exist_ok=True)
    heads = [[local]] if isinstance(local, KVIndex) else local.heads
    for b, row in enumerate(heads):
        for h, kvi in enumerate(row):
            kvi.index.save(os.path.join(folder, f"b{b}_h{h}.hsr"))
            np.save(os.path.join(folder, f"b{b}_h{h}.values.npy"), kvi.values, allow_pickle=False)
    _write_meta(folder, kind=type(local).__name__, rank=rank, world=world, start=int(start),
                batch=len(heads), kv_heads=len(heads[0]))


def load_kv(path, rank: int, world: int):
    """``(local, start)``: rank's shard (a KVIndex or KVCacheIndex) and its saved start."""
    folder = shard_dir(path, rank, world)
    meta = _read_meta(folder, rank, world, ("KVIndex", "KVCacheIndex"))
    heads = [[KVIndex.from_index(HSRIndex.load(os.path.join(folder, f"b{b}_h{h}.hsr")),
                                 np.load(os.path.join(folder, f"b{b}_h{h}.values.npy"), allow_pickle=False))
              for h in range(int(meta["kv_heads"]))] for b in range(int(meta["batch"]))]
    if meta["kind"] == "KVIndex":
        return heads[0][0], int(meta["start"])
    return KVCacheIndex.from_heads(heads), int(meta["start"])


def save_index(path, index: HSRIndex, rank, world, start) -> None:
    folder = shard_dir(path, rank, world)
    os.makedirs(folder, exist_ok=True)
    index.save(os.path.join(folder, "index.hsr"))
    _write_meta(folder, kind="HSRIndex", rank=rank, world=world, start=int(start))


def load_index(path, rank: int, world: int):
    """``(index, start)``: rank's :class:`hsr.HSRIndex` and its saved start."""
    folder = shard_dir(path, rank, world)
    meta = _read_meta(folder, rank, world, ("HSRIndex",))
    return HSRIndex.load(os.path.join(folder, "index.hsr")), int(meta["start"])


def load_shard(path: StrPath, rank: int, world: int) -> tuple[KVIndex | KVCacheIndex | HSRIndex, int]:
    """One rank's saved shard, read by itself (no process group): ``(local, start)`` with
    ``local`` a KVIndex, KVCacheIndex or HSRIndex, whichever was saved."""
    folder = shard_dir(path, rank, world)
    meta = _read_meta(folder, rank, world, ("KVIndex", "KVCacheIndex", "HSRIndex"))
    return load_index(path, rank, world) if meta["kind"] == "HSRIndex" else load_kv(path, rank, world)
