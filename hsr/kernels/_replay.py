"""Eager calls of a GPU cache, replayed from CUDA graphs captured per call shape.

A decode step of :class:`hsr.kernels.CodeKVCache` is three or four Triton launches. Launched
from Python, each costs more host time than the kernel runs on the GPU (Triton binds and
hashes ~60 arguments per launch: 240–560 µs for an eager step on an H100 whose GPU work took
50–60 µs), so an eager caller — ``cache.add`` then ``cache.attend`` in a loop, or
transformers' ``generate()`` without CUDA graphs — was host-bound. :class:`Replays` records
each call shape once and replays it: a call then costs a copy of its inputs into the graph's
buffers, one graph launch and a copy of its outputs.

Why one graph serves every call of a shape: the kernels read the cache's length on the
device and size their grids from the capacity, so a graph is right at every length up to the
capacity; growing past it reallocates (a new ``storage``), which drops every graph.

The first call of a shape runs eagerly (no capture for one-off shapes; ``record_first``
records at once, for a generation loop); the second runs eagerly on the entry's own input
buffers — it is the real call, and it compiles what the capture records — then captures;
later calls replay. At most ``limit`` shapes are kept
(least recently used dropped). Graphs of one cache share one memory pool: they replay one at
a time, in the order of the calls, on one stream. A call on another stream than the capture's,
or inside someone else's capture, runs eagerly.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Hashable, Optional, Sequence

import torch

from .._arrays import tensor_version
from ._code_plan import capturing

__all__ = ["Replays"]


def _stamp(x: Optional[torch.Tensor]):
    """``(x, version)``: what a buffer copied from ``x`` holds, while ``x`` stays at that version
    (None where that cannot be told: no tensor, or no version counter)."""
    version = None if x is None else tensor_version(x)
    return None if version is None else (x, version)


class _Entry:
    __slots__ = ("graph", "inputs", "outputs", "stream", "last")

    def __init__(self, graph, inputs, outputs, stream, last):
        self.graph = graph
        self.inputs = inputs
        self.outputs = outputs
        self.stream = stream
        self.last = last  # the _stamp of what each buffer was last copied from


class Replays:
    """Per-shape CUDA graphs of one cache's eager calls.

    Parameters
    ----------
    device : torch.device
        The cache's device: off CUDA every call runs eagerly.
    limit : int
        Shapes kept (each holds its graph and its buffers).

    Attributes
    ----------
    enabled : bool
        False: every call runs eagerly (set it to compare, or where graphs are unwanted).
    record_first : bool
        True: the first call of a shape records its graph (after running eagerly on the
        graph's buffers), for a caller whose shapes repeat — a generation loop, whose first
        decode step is its warm-up anyway. Default False: one-off shapes record nothing.
    """

    def __init__(self, device: torch.device, limit: int = 16) -> None:
        self.enabled = device.type == "cuda"
        self.record_first = False
        self._index = device.index  # the cache's device (None: the current one, asked at first use)
        self.limit = int(limit)
        self._mutex = threading.Lock()  # one replay at a time: buffers and the pool are shared
        self._entries: OrderedDict = OrderedDict()
        self._seen: set = set()  # keys run once, eagerly: the next call captures
        self._storage = None
        self._pool = None

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every graph (and its buffers)."""
        with self._mutex:
            self._drop()

    def _drop(self) -> None:
        self._entries.clear()
        self._seen.clear()

    def run(self, key: Hashable, storage: int, inputs: Sequence[Optional[torch.Tensor]],
            body: Callable[[tuple], tuple]) -> tuple:
        """``body(inputs)``, replayed from a graph when this ``key`` was seen before.

        Parameters
        ----------
        key : hashable
            Everything the launches depend on besides the inputs' values: shapes, dtypes,
            options and numbers baked into the launches.
        storage : int
            The cache's allocation count: a new one drops every graph.
        inputs : sequence of Tensor or None
            The tensors ``body`` reads (None where it reads none); a replay copies them into
            the graph's buffers, so they may have any strides.
        body : callable
            ``body(inputs) -> tuple of Tensor``: the launches, no synchronisation.

        Returns
        -------
        tuple of Tensor
            ``body``'s outputs; from a replay, copies of the graph's own (the next replay
            overwrites those).
        """
        if not self.enabled or capturing():
            return body(tuple(inputs))
        stream = self._stream()
        with self._mutex:
            if storage != self._storage:  # reallocated: every graph points at the old storage
                self._drop()
                self._storage = storage
            entry = self._entries.get(key)
            if entry is not None and entry.stream == stream:
                self._entries.move_to_end(key)
                dst, src = [], []
                for i, (buf, x) in enumerate(zip(entry.inputs, inputs)):
                    if buf is None:
                        continue
                    # the same tensor, unwritten since (views share the version counter): the
                    # buffer already holds it (a layer's thresholds, passed at every step)
                    stamp, last = _stamp(x), entry.last[i]
                    if stamp is not None and last is not None and last[0] is x and last[1] == stamp[1]:
                        continue
                    dst.append(buf)
                    src.append(x)
                    entry.last[i] = stamp
                if dst:  # one call copies them all (each torch op costs ~10-17 us of host time)
                    torch._foreach_copy_(dst, src)
                entry.graph.replay()
                return tuple(o.clone() for o in entry.outputs)
            if entry is not None:  # recorded on another stream
                return body(tuple(inputs))
            if key not in self._seen and not self.record_first:  # a first sighting
                self._seen.add(key)
                return body(tuple(inputs))
            return self._capture(key, inputs, body, stream)

    def _stream(self):
        """The current stream's id on the cache's device (``torch.cuda.current_stream()`` builds
        a Python object per call: 20 us of host time on an H100 host, more than a replay)."""
        if self._index is None:
            self._index = torch.cuda.current_device()
        get = getattr(torch._C, "_cuda_getCurrentStream", None)
        return get(self._index)[0] if get is not None else torch.cuda.current_stream(self._index).stream_id

    def _record(self, body, bufs):
        """``(graph, outputs)``: ``body(bufs)`` recorded (not run) in a CUDA graph whose
        ``replay()`` runs it again, writing ``outputs``."""
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # thread_local: another thread's CUDA work during the capture is not an error
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            outputs = body(bufs)
        return graph, outputs

    def _capture(self, key, inputs, body, stream):
        bufs = tuple(None if x is None else x.clone(memory_format=torch.contiguous_format) for x in inputs)
        result = body(bufs)  # the real call, on the buffers: it also compiles what the capture records
        graph, outputs = self._record(body, bufs)
        self._entries[key] = _Entry(graph, bufs, outputs, stream, [_stamp(x) for x in inputs])
        self._seen.discard(key)
        while len(self._entries) > self.limit:
            self._entries.popitem(last=False)
        return result
