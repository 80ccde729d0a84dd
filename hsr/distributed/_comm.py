"""The collectives the sharded indexes use, over ``torch.distributed`` (gloo or NCCL).

Failure protocol (see ``docs/distributed.md``):

* Work that may fail on one rank only (a search, an attention, a check of the input) runs
  inside :meth:`Comm.attempt`; its failure is not raised at once but sent as a flag in the
  next collective, which every rank reaches anyway. When a flag is set, every rank gathers
  the failing ranks' messages (one more collective) and raises: the failing rank its own
  exception, the others :class:`ShardError` naming the rank and the message. The group
  stays usable.
* A collective that itself fails (a rank exited, or did not arrive within the process
  group's ``timeout``) raises :class:`ShardError` on the ranks that see it; the group is then
  broken (destroy and re-create it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._typing import ProcessGroup

__all__ = ["ShardError", "Comm"]


class ShardError(RuntimeError):
    """A sharded call failed on another rank, or a collective failed (a rank exited or timed out)."""


class Comm:
    """The process group of a sharded index: rank, world size, and guarded collectives.

    Parameters
    ----------
    group : torch.distributed.ProcessGroup, optional
        Default: the default group (``torch.distributed.init_process_group`` first; give it a
        ``timeout`` so that a dead rank cannot make the others wait for long).
    """

    def __init__(self, group=None):
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group("
                               "backend, ..., timeout=...) on every rank first")
        self.torch, self.dist, self.group = torch, dist, group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.root = dist.get_global_rank(group, 0) if group is not None else 0
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" \
            else torch.device("cpu")
        self._pending = None  # (exception) of the last failed attempt, not yet reported

    # ------------------------------------------------------------------ failures
    def attempt(self, fn, *args, **kwargs):
        """Run ``fn``; on an exception remember it (reported at the next :meth:`check`) and
        return None."""
        if self._pending is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # reported to every rank at the next check
            self._pending = exc
            return None

    @property
    def failed(self) -> bool:
        return self._pending is not None

    def check(self, flags, what: str) -> None:
        """After a collective that carried each rank's failure flag (``flags`` (world,) truthy
        where a rank failed): raise on every rank if any failed."""
        flags = np.asarray(flags).astype(bool)
        mine, self._pending = self._pending, None
        if not flags.any():
            return
        msg = None if mine is None else f"{type(mine).__name__}: {mine}"
        got = [None] * self.world
        self._collective(what + " (error report)", self.dist.all_gather_object, got, msg, group=self.group)
        failed = [(r, m) for r, m in enumerate(got) if m is not None]
        text = "; ".join(f"rank {r}: {m}" for r, m in failed)
        if mine is not None:
            note = f"(hsr.distributed: {what} failed here; the other ranks raise ShardError)"
            if hasattr(mine, "add_note"):
                mine.add_note(note)
            raise mine
        raise ShardError(f"{what} failed on {len(failed)} of {self.world} ranks: {text}")

    def _collective(self, what, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ShardError:
            raise
        except Exception as exc:
            raise ShardError(
                f"rank {self.rank}: the collective of {what} failed ({type(exc).__name__}: {str(exc)[:400]}). "
                "Another rank exited, raised outside hsr, or did not answer within the process group's timeout; "
                "the group may be unusable now (destroy it and initialise again)") from exc

    # ------------------------------------------------------------------ collectives
    def _to_wire(self, t):
        return t.to(self.device) if t.device != self.device else t

    def broadcast(self, t, what: str):
        """Broadcast tensor ``t`` from rank 0 of the group, in place; returns it."""
        wire = self._to_wire(t)
        self._collective(what, self.dist.broadcast, wire, src=self.root, group=self.group)
        if wire is not t:
            t.copy_(wire)
        return t

    def all_gather(self, t, what: str, *, keep_on_wire: bool = False):
        """``(world, *t.shape)`` tensor of every rank's ``t`` (same shape on every rank), on
        ``t``'s device (``keep_on_wire``: on the collective's device, host memory for gloo)."""
        torch = self.torch
        wire = self._to_wire(t.contiguous())
        out = torch.empty((self.world,) + tuple(wire.shape), dtype=wire.dtype, device=wire.device)
        if self.backend == "gloo":
            parts = list(out.unbind(0))
            self._collective(what, self.dist.all_gather, parts, wire, group=self.group)
        else:
            self._collective(what, self.dist.all_gather_into_tensor, out, wire, group=self.group)
        return out.to(t.device) if (out.device != t.device and not keep_on_wire) else out

    def gather_rows(self, arr: np.ndarray, what: str) -> np.ndarray:
        """All ranks' float64 ``arr`` (same shape everywhere) plus their failure flags; raises on
        every rank if any rank failed (after :meth:`attempt`). Returns ``(world, *arr.shape)``."""
        torch = self.torch
        flat = np.zeros(arr.size + 1)
        if not self.failed:
            flat[:-1] = np.asarray(arr, dtype=np.float64).ravel()
        flat[-1] = 1.0 if self.failed else 0.0
        got = self.all_gather(torch.from_numpy(flat), what).cpu().numpy()
        self.check(got[:, -1], what)
        return got[:, :-1].reshape((self.world,) + tuple(arr.shape))

    def gather_bytes(self, buf: bytes | None, what: str) -> list[bytes]:
        """All ranks' variable-length byte strings (two collectives: lengths, then the padded
        bytes); raises on every rank if any rank failed."""
        torch = self.torch
        data = b"" if (buf is None or self.failed) else buf
        head = torch.tensor([len(data), 1 if self.failed else 0], dtype=torch.int64)
        heads = self.all_gather(head, what + " (sizes)").cpu().numpy()
        self.check(heads[:, 1], what)
        size = int(heads[:, 0].max())
        pad = np.zeros(max(size, 1), dtype=np.uint8)
        pad[:len(data)] = np.frombuffer(data, dtype=np.uint8)
        got = self.all_gather(torch.from_numpy(pad), what).cpu().numpy()
        return [got[r, :int(heads[r, 0])].tobytes() for r in range(self.world)]

    def agree(self, what: str) -> None:
        """A collective that only exchanges failure flags (after local work in :meth:`attempt`)."""
        self.gather_rows(np.zeros(0), what)


class Sharded:
    """What a sharded index and a sharded cache share: the process group, the local shard and
    where it sits (rank r holds global ids/positions ``[starts[r], starts[r] + n_r)``)."""

    def __init__(self, local: Any, group: ProcessGroup | None, broadcast_queries: bool) -> None:
        self.comm = Comm(group)
        self.local = local
        self.broadcast_queries = bool(broadcast_queries)
        self.starts = np.zeros(1, dtype=np.int64)
        self._n = 0

    def _set_sizes(self, sizes) -> None:
        """Each rank's count ``(world,)``: the starts and the global size."""
        sizes = np.asarray(sizes, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self._n = int(sizes.sum())

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world(self) -> int:
        return self.comm.world

    @property
    def start(self) -> int:
        """This rank's first global id (position)."""
        return int(self.starts[self.rank])

    def __len__(self) -> int:
        return self._n

    @classmethod
    def _load(cls, read: Any, path: Any, group: ProcessGroup | None, broadcast_queries: bool) -> Any:
        """Each rank reads its own shard with ``read(path, rank, world) -> (local, start)``;
        collective: the ranks agree it worked, and each checks its start is where it was saved."""
        comm = Comm(group)
        got = comm.attempt(read, path, comm.rank, comm.world)
        comm.agree(f"{cls.__name__}.load")
        local, saved = got
        self = cls(local, group=group, broadcast_queries=broadcast_queries)
        if saved != self.start:
            raise ValueError(f"rank {self.rank}: shard saved at start {saved}, but the loaded shards put it "
                             f"at {self.start}")
        return self

