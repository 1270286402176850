"""On-disk cache of precomputed projection matrices (CSR arrays in a plain .npz, never pickled).

Files live in ``$NAPARI_PETDIFF_CACHE/projectors`` (default ``~/.cache/napari-petdiff/projectors``),
are named by a hash of everything the matrix depends on, are written atomically, and are fully
verified on load (format, key, digest, CSR structure); anything wrong means "rebuild", never a crash.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
ARRAY_NAMES = ("a_indptr", "a_indices", "a_data", "t_indptr", "t_indices", "t_data")


def default_cache_dir() -> Path:
    root = os.environ.get("NAPARI_PETDIFF_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "napari-petdiff"
    return base / "projectors"


def digest(arrays: dict) -> str:
    h = hashlib.blake2b(digest_size=20)
    for name in ARRAY_NAMES:
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _check_csr(indptr, indices, data, n_rows, n_cols, data_dtype) -> str | None:
    if indptr.ndim != 1 or indptr.shape[0] != n_rows + 1 or indptr.dtype.kind != "i":
        return "bad row pointer array"
    if indices.ndim != 1 or indices.dtype.kind != "i" or data.ndim != 1 or data.shape != indices.shape:
        return "bad index/value arrays"
    if data.dtype != np.dtype(data_dtype):
        return f"values stored as {data.dtype}, expected {data_dtype}"
    if indptr[0] != 0 or indptr[-1] != indices.shape[0] or np.any(np.diff(indptr) < 0):
        return "inconsistent row pointers"
    if indices.size and (indices.min() < 0 or indices.max() >= n_cols):
        return "column index out of range"
    if not np.all(np.isfinite(data)):
        return "non-finite values"
    return None


def load(path: Path, key: str, shape: tuple[int, int], data_dtype) -> dict | None:
    """Arrays of a verified cache file, or None if missing/corrupt (a corrupt file is removed)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(bytes(f["meta"]).decode("utf-8"))
            arrays = {name: f[name] for name in ARRAY_NAMES}
        if meta.get("format") != FORMAT_VERSION or meta.get("key") != key:
            raise ValueError("format version or key mismatch")
        if digest(arrays) != meta.get("digest"):
            raise ValueError("content digest mismatch")
        n_rows, n_cols = shape
        for prefix, (r, c) in (("a", (n_rows, n_cols)), ("t", (n_cols, n_rows))):
            why = _check_csr(arrays[f"{prefix}_indptr"], arrays[f"{prefix}_indices"], arrays[f"{prefix}_data"],
                             r, c, data_dtype)
            if why:
                raise ValueError(why)
        if arrays["a_data"].shape != arrays["t_data"].shape:
            raise ValueError("matrix and transpose differ in size")
        meta["arrays"] = arrays
        return meta
    except Exception as exc:  # any defect (truncation, bad CRC, tampering) means: rebuild
        warnings.warn(f"projector cache file {path} is unusable ({exc}); rebuilding it", RuntimeWarning,
                      stacklevel=3)
        try:
            path.unlink()
        except OSError:
            pass
        return None


def save(path: Path, key: str, arrays: dict, info: dict) -> bool:
    """Write atomically; returns False (with a warning) when the cache directory is not writable."""
    path = Path(path)
    meta = dict(info, format=FORMAT_VERSION, key=key, digest=digest(arrays))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8), **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return True
    except OSError as exc:
        warnings.warn(f"could not write projector cache {path} ({exc}); continuing without it", RuntimeWarning,
                      stacklevel=3)
        return False
