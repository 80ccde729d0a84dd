"""Index files: writing them atomically, reading them defensively (the checksum, header
fields, and ``.npy`` members).

Every check turns a damaged or crafted file into a ``ValueError`` before anything is
allocated from what the file claims (``HSRIndex.load`` rebuilds the derived arrays too).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile

import numpy as np


def _digest(arrays) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _meta_int(meta: dict, key: str, lo: int, hi: int) -> int:
    """An integer field of a file's header, within ``[lo, hi]``."""
    v = meta.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"hsr index file is inconsistent: {key} = {v!r} (an integer in [{lo}, {hi}])")
    return v


def _meta_ids(arrays: dict, name: str, n_total: int) -> np.ndarray:
    """The caller ids a saved tree (or the buffer) holds, checked against the key count."""
    ids = arrays.get(f"{name}_ids")
    end = arrays.get(f"{name}_node_end")
    if ids is None or end is None or ids.ndim != 1 or ids.dtype.kind not in "iu" or end.ndim != 1 or not len(end):
        raise ValueError(f"hsr index file is inconsistent: tree {name!r} has no ids")
    n = int(end[0])
    if not 0 <= n <= len(ids):
        raise ValueError(f"hsr index file is inconsistent: tree {name!r} claims {n} of {len(ids)} ids")
    ids = ids[:n].astype(np.int64)
    if n and (ids.min() < 0 or ids.max() >= n_total):
        raise ValueError(f"hsr index file is inconsistent: tree {name!r} holds ids outside [0, {n_total})")
    return ids


def _read_npy(zf: zipfile.ZipFile, name: str) -> np.ndarray:
    """One ``.npy`` member, its header checked against the member's size before anything is
    allocated (a header may claim any shape)."""
    info = zf.getinfo(name)
    with zf.open(name) as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fh, max_header_size=1 << 16)
    if dtype.hasobject:
        raise ValueError(f"{name}: object arrays are not allowed")
    need = float(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if need > info.file_size:
        raise ValueError(f"{name}: its header claims {need:.0f} bytes, the file holds {info.file_size}")
    return np.load(io.BytesIO(zf.read(name)), allow_pickle=False)


def write_index_file(path, meta: dict, arrays: dict) -> None:
    """A zip of ``.npy`` arrays (no pickle) and ``meta.json``, written atomically: a temporary
    file beside the target, flushed and fsynced, then renamed over it, so a process killed
    mid-save leaves the previous file intact."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".hsr-save-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
                zf.writestr("meta.json", json.dumps(meta))
                for name, arr in arrays.items():
                    buf = io.BytesIO()
                    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
                    zf.writestr(name + ".npy", buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_index_file(path):
    """``(meta, arrays)`` of a file :func:`write_index_file` wrote; ``ValueError`` for any
    truncated or corrupted file (the caller validates the contents)."""
    try:
        with zipfile.ZipFile(path, "r") as zf:
            info = zf.getinfo("meta.json")
            if info.file_size > 1 << 20:
                raise ValueError("meta.json is larger than 1 MiB")
            meta = json.loads(zf.read("meta.json").decode("utf-8"))
            arrays = {}
            for name in zf.namelist():
                if name.endswith(".npy"):
                    arrays[name[:-4]] = _read_npy(zf, name)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as exc:  # zipfile, zlib, json and numpy each fail their own way on bad bytes
        raise ValueError(f"cannot read hsr index from {path!s}: truncated or corrupted "
                         f"({type(exc).__name__}: {exc})") from exc
    return meta, arrays
