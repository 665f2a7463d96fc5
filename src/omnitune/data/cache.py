"""The build step of the map-style dataset: worker pool (preprocessing_num_workers) and the
preprocessing cache (basic_parameters.cache_dir, overwrite_cache).

What is built (and cached): the flat int32 id / label arrays, the sample offsets, the per-sample
media metadata and the length-limit counts that :class:`omnitune.data.dataset.SFTDataset` holds.

Cache entry: ``<cache_dir>/<key>/`` with input_ids.npy, labels.npy, offsets.npy (memory-mapped on
load, so ranks and DataLoader workers share the pages) and meta.json. The key is a hash of
everything the result depends on:

- the bytes of every dataset file (sha256), and the current directory (relative media paths
  resolve against it);
- the tokenizer (its full serialized form, added tokens included) and the image / video / audio
  processor settings;
- the template (its content, not only its name), every data.json ``preprocess_parameters`` and
  ``basic_parameters`` setting that shapes the result, the length limit (min(seq_length, cutoff_len));
- the source of the omnitune.data modules and a format version (a code upgrade never reuses a
  stale entry).

Media files referenced by the samples are checked on load: the entry records (path, size, mtime)
of each and is rebuilt when any differs. Settings that cannot change the result (cache_dir,
overwrite_cache, preprocessing_num_workers / batch_size, val_*) are not part of the key.

Several processes (ranks) starting at once: a reader that finds a valid entry loads it without
locking. Otherwise it takes an exclusive file lock (``<key>.lock``), checks again (another process
may have just built it), builds, writes into a temp folder and renames it into place
(omnitune.fsutil.atomic_dir). So one process builds, the others wait and then load.
``overwrite_cache: true`` rebuilds once per start: an entry written after this process asked for
the data is reused, so ranks starting together still build once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omnitune.data.formats import DataError, load_samples, resolve_dataset_files
from omnitune.fsutil import atomic_dir

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
_NOT_IN_KEY = {"cache_dir", "overwrite_cache", "preprocessing_num_workers", "preprocessing_batch_size",
               "streaming", "val_dataset", "val_rate", "val_max_samples"}
_MEDIA_KEYS_SKIP = {"messages", "source", "index"}


@dataclass
class BuiltData:
    input_ids: np.ndarray          # int32, all samples concatenated
    labels: np.ndarray             # int32
    offsets: np.ndarray            # int64 [n sequences + 1] (2 sequences per preference pair)
    media: list                    # per-sample media metadata (SFTDataset.media)
    counts: tuple[int, int, int]   # (truncated, dropped for media cut, dropped untrained)
    num_samples: int               # samples read before the length limit


# ------------------------------------------------------------------------------------- building
_POOL_STATE = None  # (dataset, samples, chunk size): inherited by forked workers, never pickled


def _encode_chunk(i: int) -> list:
    ds, samples, size = _POOL_STATE
    return ds.encode_samples(samples[i * size:(i + 1) * size])


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def encode_all(ds, samples: list[dict], num_workers: int | None, batch_size: int) -> list:
    """``ds.encode_samples`` over ``samples`` in chunks; with num_workers > 1 in that many forked
    processes (at most one per available CPU). The result is the same list whatever the worker
    count (chunks are independent and collected in order)."""
    global _POOL_STATE
    workers = min(num_workers or 1, available_cpus(), max(1, len(samples)))  # more processes than CPUs only add overhead
    if workers <= 1:
        out = []
        for start in range(0, len(samples), batch_size):
            out.extend(ds.encode_samples(samples[start:start + batch_size]))
        return out
    # Several chunks per worker keep them all busy to the end; fork shares the tokenizer and samples.
    size = max(1, min(batch_size, math.ceil(len(samples) / (workers * 4))))
    n_chunks = math.ceil(len(samples) / size)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # processes give the parallelism now
    _POOL_STATE = (ds, samples, size)
    try:
        with mp.get_context("fork").Pool(workers) as pool:
            out = []
            for part in pool.imap(_encode_chunk, range(n_chunks)):
                out.extend(part)
            return out
    finally:
        _POOL_STATE = None


def _library_versions() -> dict:
    import tokenizers
    import transformers

    return {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def build(ds, cfg) -> BuiltData:
    """Read, encode and length-limit every sample of ``cfg`` (no cache)."""
    bp = cfg.dataset_param.basic_parameters
    samples = load_samples(cfg)
    return _assemble(encode_all(ds, samples, bp.preprocessing_num_workers, bp.preprocessing_batch_size),
                     len(samples))


def _assemble(results: list, num_samples: int) -> BuiltData:
    ids_parts, label_parts, media = [], [], []
    truncated = dropped_media = dropped_untrained = 0
    for r in results:
        if r == "media":
            dropped_media += 1
        elif r == "untrained":
            dropped_untrained += 1
        else:
            seqs, cut, meta = r
            for ids, labels in seqs:  # 2 sequences for a preference pair
                ids_parts.append(ids)
                label_parts.append(labels)
            media.append(meta)
            truncated += bool(cut)
    def cat(parts):  # the parts are int32 already: no second copy of all tokens
        return np.concatenate(parts).astype(np.int32, copy=False) if parts else np.zeros(0, np.int32)

    return BuiltData(cat(ids_parts), cat(label_parts), np.cumsum([0] + [len(x) for x in ids_parts], dtype=np.int64),
                     media, (truncated, dropped_media, dropped_untrained), num_samples)


# ------------------------------------------------------------------------------------- the key
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _code_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5")


def processor_fingerprint(processor) -> str:
    """Hash of the tokenizer and of every media processor's settings.

    Tokenizer: the bytes of the non-weight files of the folder it was loaded from (tokenizer.json,
    tokenizer_config.json, vocab, merges, chat template, ...), plus its size and added tokens in
    memory; a tokenizer not loaded from a folder is hashed from its full serialized form."""
    h = hashlib.sha256()
    tok = getattr(processor, "tokenizer", processor)
    h.update(type(tok).__name__.encode())
    folder = Path(str(getattr(tok, "name_or_path", "") or ""))
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.endswith(_WEIGHTS)) \
        if folder.is_dir() else []
    if files:
        for f in files:
            h.update(f.name.encode() + b"\0" + _sha256_file(f).encode())
    elif getattr(tok, "backend_tokenizer", None) is not None:
        h.update(tok.backend_tokenizer.to_str().encode())
    else:  # a slow tokenizer: its vocabulary
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(str(len(tok)).encode())
    h.update(json.dumps(sorted((str(k), str(v)) for k, v in tok.added_tokens_decoder.items())).encode())
    for name in ("image_processor", "video_processor", "feature_extractor"):
        sub = getattr(processor, name, None)
        if sub is not None:
            h.update(name.encode() + type(sub).__name__.encode())
            h.update(sub.to_json_string().encode() if hasattr(sub, "to_json_string") else repr(sub).encode())
    return h.hexdigest()


def cache_key(ds, cfg, processor, files: list[Path]) -> tuple[str, dict]:
    """(hex key, the inputs it was computed from) for building ``cfg`` with dataset ``ds``."""
    dp = cfg.dataset_param.model_dump(mode="json")
    for k in _NOT_IN_KEY:
        dp["basic_parameters"].pop(k, None)
    template = dataclasses.asdict(ds.template) if dataclasses.is_dataclass(ds.template) else repr(ds.template)
    inputs = {
        "format": CACHE_FORMAT,
        "code": _code_hash(),
        "libraries": _library_versions(),  # tokenization and image grids come from these
        "dataset_param": dp,
        "template": template,
        "max_length": ds.max_length,
        "processor": processor_fingerprint(processor),
        "files": [[str(f), _sha256_file(f)] for f in files],
        "cwd": os.getcwd(),
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=repr).encode()).hexdigest()[:32]
    return key, inputs


# ------------------------------------------------------------------------------------- entries
def _media_manifest(samples: list[dict]) -> list[list]:
    """[path, size, mtime_ns] of every media file the samples reference (any list-of-paths column)."""
    paths = {}
    for s in samples:
        for k, v in s.items():
            if k in _MEDIA_KEYS_SKIP or not isinstance(v, (list, tuple)):
                continue
            for p in v:
                if isinstance(p, str):
                    paths[p] = None
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([p, st.st_size, st.st_mtime_ns])
    return out


def _manifest_ok(manifest: list[list]) -> bool:
    for p, size, mtime in manifest:
        try:
            st = os.stat(p)
        except OSError:
            return False
        if st.st_size != size or st.st_mtime_ns != mtime:
            return False
    return True


def _jsonable(x):
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"cannot store {type(x).__name__} in the preprocessing cache")


def _load(entry: Path, since: float | None) -> BuiltData | None:
    """The entry when it is complete, current (its media unchanged) and, with ``since``, written
    at or after that time; else None."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("format") != CACHE_FORMAT or (since is not None and meta["built_at"] < since):
            return None
        if not _manifest_ok(meta["manifest"]):
            log.info("preprocessing cache %s: a media file changed; rebuilding", entry)
            return None
        arrays = [np.load(entry / f"{n}.npy", mmap_mode="r", allow_pickle=False)
                  for n in ("input_ids", "labels", "offsets")]
    except (OSError, ValueError, KeyError):
        return None  # absent, or being replaced right now: take the locked path
    from omnitune.data.dataset import MediaMeta
    return BuiltData(*arrays, [MediaMeta.from_json(m) for m in meta["media"]], tuple(meta["counts"]),
                     meta["num_samples"])


def _write(entry: Path, data: BuiltData, manifest: list, inputs: dict) -> None:
    with atomic_dir(entry) as tmp:
        np.save(tmp / "input_ids.npy", data.input_ids)
        np.save(tmp / "labels.npy", data.labels)
        np.save(tmp / "offsets.npy", data.offsets)
        meta = {"format": CACHE_FORMAT, "built_at": time.time(), "num_samples": data.num_samples,
                "counts": list(data.counts), "manifest": manifest, "inputs": inputs,
                "media": [m.to_json() for m in data.media]}
        (tmp / "meta.json").write_text(json.dumps(meta, default=_jsonable))


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_or_load(ds, cfg, processor) -> BuiltData:
    """The built data of ``cfg`` for dataset ``ds``: from the cache when cache_dir is set and holds
    a current entry, else built (and stored when cache_dir is set)."""
    bp = cfg.dataset_param.basic_parameters
    if not bp.cache_dir:
        return build(ds, cfg)
    since = time.time() if bp.overwrite_cache else None
    cache_dir = Path(bp.cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{cfg.source}: basic_parameters.cache_dir {bp.cache_dir!r} cannot be created ({e}); "
                        f"give a writable folder or null") from None
    key, inputs = cache_key(ds, cfg, processor, resolve_dataset_files(cfg))
    entry = cache_dir / key
    data = _load(entry, since)
    if data is None:
        with _locked(cache_dir / f"{key}.lock"):
            data = _load(entry, since)  # built by another process while this one waited
            if data is None:
                t0 = time.perf_counter()
                samples = load_samples(cfg)
                data = _assemble(encode_all(ds, samples, bp.preprocessing_num_workers,
                                            bp.preprocessing_batch_size), len(samples))
                manifest = _media_manifest(samples)  # after encoding: a missing file is a DataError there
                _write(entry, data, manifest, inputs)
                log.info("preprocessing cache %s: built %d samples in %.1f s", entry, data.num_samples,
                         time.perf_counter() - t0)
                return data
    log.info("preprocessing cache %s: reused (%d samples)", entry, data.num_samples)
    return data
