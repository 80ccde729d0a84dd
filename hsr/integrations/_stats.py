"""Statistics of the transformers backends: per layer, prefill and decode separately.

``HSRStats`` (every backend owns one) accumulates a :class:`LayerStats` per layer: calls,
visible keys, keys scored and kept, and the largest certified dropped softmax mass. Thread-safe
(a lock per ``HSRStats``); no torch or transformers import.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Dict, Optional

__all__ = ["HSRStats", "LayerStats"]


@dataclass
class LayerStats:
    """Accumulated counters of one layer (summed over calls and over query heads).

    ``keys_visible`` is the number of (query head, query, key) triples the causal mask allows
    (pad keys excluded); ``keys_scored`` the keys whose score was computed; ``keys_selected``
    the keys that entered the softmax (or ReLU). Fractions divide by ``keys_visible``.
    ``keys_scored`` can exceed ``keys_visible`` in prefill: the index's leaves mix positions and
    a scanned leaf is counted whole. ``dense_calls`` counts the calls that took the dense path
    below ``dense_below`` (no index: torch SDPA for the default softmax, else a dense torch
    computation of the same selection rule); their keys count as scored and nothing is dropped.
    ``guarded_calls`` counts the decode calls the per-layer guard sent the same dense way (it
    timed the layer's dense step faster than its step through the index).
    """

    calls: int = 0
    dense_calls: int = 0
    guarded_calls: int = 0
    queries: int = 0
    keys_visible: int = 0
    keys_scored: int = 0
    keys_selected: int = 0
    max_dropped: float = 0.0
    index_s: float = 0.0
    search_s: float = 0.0
    attend_s: float = 0.0

    @property
    def scored_fraction(self) -> float:
        return self.keys_scored / self.keys_visible if self.keys_visible else 0.0

    @property
    def selected_fraction(self) -> float:
        return self.keys_selected / self.keys_visible if self.keys_visible else 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["scored_fraction"] = self.scored_fraction
        d["selected_fraction"] = self.selected_fraction
        return d


_SUMMED = ("calls", "dense_calls", "guarded_calls", "queries", "keys_visible", "keys_scored", "keys_selected", "index_s",
           "search_s", "attend_s")


class HSRStats:
    """Per-layer statistics of a backend since the last :meth:`reset`.

    Times: ``index_s`` building or appending to the index (on-the-fly builds and cache syncs
    triggered by the backend), ``search_s`` the index search, ``attend_s`` the attention over
    the selected keys. The certified softmax search accumulates the output while it searches,
    so for ``kind="softmax"`` both are one fused kernel, reported under ``search_s``.
    """

    def __init__(self, _with_decode: bool = True) -> None:
        self.layers: Dict[int, LayerStats] = {}
        self._lock = threading.Lock()
        #: the same counters restricted to decode calls (q_len == 1)
        self.decode: Optional[HSRStats] = HSRStats(False) if _with_decode else None

    def reset(self) -> None:
        with self._lock:
            self.layers.clear()
        if self.decode is not None:
            self.decode.reset()

    def layer(self, idx: int) -> LayerStats:
        with self._lock:
            return self.layers.setdefault(int(idx), LayerStats())

    def add(self, idx: int, delta: LayerStats) -> None:
        """Accumulate one call's counters into layer ``idx``."""
        st = self.layer(idx)
        with self._lock:
            for f in _SUMMED:
                setattr(st, f, getattr(st, f) + getattr(delta, f))
            st.max_dropped = max(st.max_dropped, delta.max_dropped)

    def _total(self) -> LayerStats:
        t = LayerStats()
        for s in self.layers.values():
            for f in _SUMMED:
                setattr(t, f, getattr(t, f) + getattr(s, f))
            t.max_dropped = max(t.max_dropped, s.max_dropped)
        return t

    @property
    def total(self) -> LayerStats:
        """All layers together."""
        return self._total()

    @property
    def scored_fraction(self) -> float:
        return self._total().scored_fraction

    @property
    def selected_fraction(self) -> float:
        return self._total().selected_fraction

    @property
    def max_dropped(self) -> float:
        return self._total().max_dropped

    @property
    def dense_fraction(self) -> float:
        """Fraction of the calls that took the dense path (no index) below ``dense_below``."""
        t = self._total()
        return t.dense_calls / t.calls if t.calls else 0.0

    def summary(self) -> dict:
        """JSON-ready ``{"total": {...}, "layers": {idx: {...}}}``."""
        return {"total": self._total().as_dict(),
                "layers": {int(k): v.as_dict() for k, v in sorted(self.layers.items())}}

    def table(self, per_layer: bool = True) -> str:
        """A plain-text table, one row per layer and a total row."""
        head = f"{'layer':>5} {'calls':>5} {'dense':>5} {'guard':>5} {'scored':>7} {'selected':>8} {'max eps':>9} " \
               f"{'index s':>8} {'search s':>8} {'attend s':>8}"
        rows = [head]

        def row(name, s):
            return (f"{name:>5} {s.calls:>5} {s.dense_calls:>5} {s.guarded_calls:>5} {s.scored_fraction:>7.3f} {s.selected_fraction:>8.3f} "
                    f"{s.max_dropped:>9.2e} {s.index_s:>8.3f} {s.search_s:>8.3f} {s.attend_s:>8.3f}")

        if per_layer:
            rows += [row(str(k), v) for k, v in sorted(self.layers.items())]
        rows.append(row("all", self._total()))
        return "\n".join(rows)

    def __repr__(self):
        t = self._total()
        return (f"HSRStats(layers={len(self.layers)}, calls={t.calls}, dense_calls={t.dense_calls}, "
                f"scored={t.scored_fraction:.3f}, "
                f"selected={t.selected_fraction:.3f}, max_dropped={t.max_dropped:.2e})")
