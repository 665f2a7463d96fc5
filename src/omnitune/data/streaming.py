"""Streaming training data (data.json ``basic_parameters.streaming: true``): samples are read,
checked, tokenized and decoded lazily while training runs, sharded by data-parallel rank and by
DataLoader worker, and the position is resumable exactly.

Order. The records of all dataset files, in file order (max_samples per file), form one pass;
passes repeat forever. Record k of a pass belongs to data-parallel rank k % dp_size (the ranks'
shards are disjoint and together cover the data). The rank's items, numbered J = 0, 1, ... over all
passes (J = pass x items per pass + item), form micro-batch blocks J // micro_batch_size, and block
b belongs to DataLoader worker b % num_workers. The DataLoader takes one batch from each worker in
turn, so it hands out the rank's items in order: the batches equal those of num_workers 0 whenever
no sample is dropped by the length limit. A worker fills its micro-batch with its next usable
samples (a dropped sample is replaced by the worker's next one). The number of items per pass is
counted when iteration starts (JSONL: lines are counted, not parsed).

Shuffle (dataloader_param.shuffle): the rank's items of a pass are shuffled inside consecutive
windows of :data:`SHUFFLE_WINDOW` items, with a permutation drawn from (seed, pass, window start):
positions above are then positions in the shuffled order. A different order every pass, still read
lazily (one window of raw records in memory), and still exactly resumable.

Position. Every micro-batch carries ``stream_state`` = the worker that made it and the item J it
will read next. The trainer hands each consumed micro-batch's state back with
:meth:`StreamingSFTDataset.advance`; :meth:`state_dict` is then the position after the last
*consumed* micro-batch (batches the workers prefetched but training has not used are not counted),
saved per rank in the checkpoint. On resume every worker starts at its saved position and the
worker roles are rotated so the first batch comes from the worker whose turn it was: training
continues with exactly the next unseen micro-batch. Resuming needs the same dp_size,
micro_batch_size and num_workers (positions are per worker); anything else is refused with a message.

Reading. JSONL is read line by line and only this rank's lines are parsed; a JSON array is parsed
incrementally (one record at a time, never the whole file in memory). A bad record raises DataError
naming the file and sample index, as the map-style build does.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from omnitune.config.data import DataConfig
from omnitune.data.formats import DataError, normalize, resolve_dataset_files

log = logging.getLogger(__name__)

STATE_FORMAT = 1
SHUFFLE_WINDOW = 1024
_CHUNK = 1 << 16


# ----------------------------------------------------------------------------------- reading
def _json_array_records(path: Path, f, buf: str) -> Iterator[tuple[int, object]]:
    """(index, record) of a JSON array, decoded one record at a time from the open file ``f``
    (``buf`` holds what was read already, starting at the '[')."""
    dec = json.JSONDecoder()
    pos, eof, index = 1, False, 0

    def refill() -> bool:
        nonlocal buf, pos, eof
        more = f.read(max(_CHUNK, len(buf)))
        eof = not more
        buf, pos = buf[pos:] + more, 0
        return bool(more)

    def skip_ws() -> str:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf):
                return buf[pos]
            if not refill():
                raise DataError(f"{path}: the JSON array ends early after sample {index - 1} (truncated file?)")

    while True:
        c = skip_ws()
        if c == "]":
            return
        if index:
            if c != ",":
                raise DataError(f"{path}: not valid JSON after sample {index - 1} (expected ',' or ']', got {c!r})")
            pos += 1
            skip_ws()
        while True:
            try:
                obj, end = dec.raw_decode(buf, pos)
                if end < len(buf) or eof:
                    break
            except json.JSONDecodeError as e:
                if eof:
                    raise DataError(f"{path}: sample {index} is not valid JSON ({e.msg}, char {e.pos}); "
                                    f"fix the file") from None
            if not refill():  # the record may continue beyond the buffer
                eof = True
        yield index, obj
        index += 1
        pos = end
        if pos > _CHUNK:
            buf, pos = buf[pos:], 0


def iter_raw_records(path: Path) -> Iterator[tuple[int, object]]:
    """(sample index, record) of a JSON-array or JSONL file, lazily. For JSONL the record is the
    raw line (str; parse it with :func:`parse_record`), so lines of other shards cost no parsing."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(_CHUNK)
            start = head.lstrip()
            if start.startswith("["):
                yield from _json_array_records(path, f, start)
                return
            if start and not start.startswith("{"):
                raise DataError(f"{path}: not valid JSON; use a JSON array of samples or JSONL")
            index, line_no, rest = 0, 0, head
            while True:
                more = f.read(_CHUNK)
                lines = rest.split("\n")
                if more:  # the last piece may be an incomplete line: complete it first
                    rest = lines.pop() + more
                for line in lines:
                    line_no += 1
                    if line.strip():
                        yield index, (line_no, line)
                        index += 1
                if not more:
                    return
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None


def parse_record(path: Path, raw):
    """The record of :func:`iter_raw_records` (JSONL lines parsed here)."""
    if isinstance(raw, tuple):
        line_no, line = raw
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {line_no} is not valid JSON ({e.msg}); fix or remove the line") from None
    return raw


# ----------------------------------------------------------------------------------- dataset
class StreamingSFTDataset(IterableDataset):
    """Infinite iterable of collated micro-batches of this rank (use DataLoader(ds, batch_size=None)).

    Items are the same as :class:`omnitune.data.dataset.SFTDataset`'s (same template, media
    handling and length limit), collated by ``collate_fn``, plus ``stream_state`` (see the module
    doc) which the training loop must remove and pass to :meth:`advance`.
    """

    def __init__(self, cfg: DataConfig, processor, seq_length: int, *, micro_batch_size: int,
                 collate_fn, dp_rank: int = 0, dp_size: int = 1, num_workers: int = 0,
                 shuffle: bool = False, seed: int = 1234, pack_capacity: int | None = None):
        from omnitune.data.dataset import SFTDataset

        if not 0 <= dp_rank < dp_size or micro_batch_size < 1:
            raise ValueError(f"bad streaming shard: dp_rank {dp_rank}, dp_size {dp_size}, "
                             f"micro_batch_size {micro_batch_size}")
        self.cfg = cfg
        self.encoder = SFTDataset(cfg, processor, seq_length, build=False)
        self.files = resolve_dataset_files(cfg)  # missing files fail here, before training starts
        self.max_samples = cfg.dataset_param.basic_parameters.max_samples
        self.collate_fn = collate_fn
        self.dp_rank, self.dp_size, self.micro_batch_size = dp_rank, dp_size, micro_batch_size
        self.num_workers = max(1, num_workers)  # 0 workers = one logical worker in the main process
        self._pos = [0] * self.num_workers
        self._batches = 0
        self.shuffle, self.seed = shuffle, seed
        #: packing (data/packing.py): each micro-batch is micro_batch_size rows of samples packed
        #: greedily in reading order up to this many tokens; None: one sample per row
        self.pack_capacity = pack_capacity

    # -- position -----------------------------------------------------------------------------
    def advance(self, stream_state: dict) -> None:
        """Record that the micro-batch carrying ``stream_state`` was consumed by training."""
        self._pos[stream_state["worker"]] = stream_state["next"]
        self._batches += 1

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "micro_batch_size": self.micro_batch_size, "num_workers": self.num_workers,
                "shuffle": self.shuffle, "seed": self.seed, "pack_capacity": self.pack_capacity, "batches": self._batches, "workers": list(self._pos),
                "files": [str(f) for f in self.files]}

    def load_state_dict(self, state: dict, source: str = "the checkpoint") -> None:
        want = {"dp_rank": self.dp_rank, "dp_size": self.dp_size, "micro_batch_size": self.micro_batch_size,
                "num_workers": self.num_workers, "shuffle": self.shuffle, "seed": self.seed,
                "pack_capacity": self.pack_capacity}
        got = {k: state.get(k) for k in want}
        if state.get("format") != STATE_FORMAT or got != want:
            raise DataError(f"{source}: the streaming position was saved with {got} but this run has {want}; "
                            f"resume with the same number of ranks, --micro-batch-size, num_workers, shuffle, "
                            f"--seed and packing / --seq-length (positions are per rank and per DataLoader worker)")
        if state.get("files") != [str(f) for f in self.files]:
            raise DataError(f"{source}: the streaming position belongs to the dataset files {state.get('files')} "
                            f"but this run reads {[str(f) for f in self.files]}")
        self._pos = [int(p) for p in state["workers"]]
        self._batches = int(state["batches"])

    # -- reading ------------------------------------------------------------------------------
    def _rank_items(self, start: int = 0) -> Iterator[tuple[int, Path, int, object]]:
        """(item j, file, sample index, raw record) of this rank in one pass, from item ``start``."""
        k = j = 0
        for path in self.files:
            for index, raw in iter_raw_records(path):
                if self.max_samples is not None and index >= self.max_samples:
                    break
                if k % self.dp_size == self.dp_rank:
                    if j >= start:
                        yield j, path, index, raw
                    j += 1
                k += 1

    def _ordered_items(self, epoch: int, start: int, per_pass: int) -> Iterator[tuple[int, Path, int, object]]:
        """(position j, file, sample index, raw record) of one pass in training order, from
        position ``start``: file order, or shuffled inside windows of SHUFFLE_WINDOW items."""
        if not self.shuffle:
            yield from self._rank_items(start)
            return
        size = SHUFFLE_WINDOW
        window = []
        for item in self._rank_items(start // size * size):
            window.append(item)
            if len(window) == size or item[0] == per_pass - 1:
                base = window[0][0]
                perm = np.random.default_rng((self.seed, epoch, base)).permutation(len(window))
                for pos in range(max(start - base, 0), len(window)):
                    _, path, index, raw = window[perm[pos]]
                    yield base + pos, path, index, raw
                window = []

    def _any_usable(self) -> bool:
        for _, path, index, raw in self._rank_items():
            if not isinstance(self.encoder.encode_samples([normalize(parse_record(path, raw), index, path,
                                                                     self.cfg)])[0], str):
                return True
        return False

    def items_per_pass(self) -> int:
        return sum(1 for _ in self._rank_items())

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        n_workers, physical = (info.num_workers, info.id) if info is not None else (1, 0)
        if n_workers != self.num_workers:
            raise DataError(f"streaming dataset set up for {self.num_workers} DataLoader worker(s) but "
                            f"iterated with {n_workers}")
        w = (physical + self._batches) % n_workers  # whose turn it is first (resume)
        per_pass = self.items_per_pass()
        if per_pass == 0:
            raise DataError(f"{self.cfg.source}: streaming: data-parallel rank {self.dp_rank} of {self.dp_size} "
                            f"gets no sample (the datasets hold fewer records than ranks)")
        mbs, items, drops = self.micro_batch_size, [], 0
        row, row_len = [], 0   # packing: the row being filled
        period = mbs * n_workers
        since_usable = 0  # items looked at since the last usable one of this worker
        big_j = self._pos[w]
        epoch, start = divmod(big_j, per_pass)
        while True:
            for j, path, index, raw in self._ordered_items(epoch, start, per_pass):
                big_j = epoch * per_pass + j
                since_usable += 1
                # Unshuffled, the assignment repeats every per_pass x period items: past that, this worker
                # will never get a usable sample. Shuffled, it will as long as the pass has one.
                if since_usable > per_pass * period and (not self.shuffle or not self._any_usable()):
                    raise DataError(f"{self.cfg.source}: streaming: data-parallel rank {self.dp_rank} (DataLoader "
                                    f"worker {w} of {n_workers}) got no usable sample in a whole pass over its "
                                    f"share of the data ({drops} dropped at the length limit "
                                    f"{self.encoder.max_length}); add data, raise cutoff_len / --seq-length or "
                                    f"lower num_workers / the micro batch size")
                if since_usable > per_pass * period:
                    since_usable = 0
                if (big_j // mbs) % n_workers != w:
                    continue
                sample = normalize(parse_record(path, raw), index, path, self.cfg)
                res = self.encoder.encode_samples([sample])[0]
                if isinstance(res, str):
                    drops += 1
                    if drops == 1:
                        log.warning("%s: sample %d dropped at the length limit %d (%s); later drops are "
                                    "not reported one by one", path, index, self.encoder.max_length,
                                    "media would be cut" if res == "media" else "no trained token left")
                    continue
                since_usable = 0
                seqs, _cut, meta = res
                if self.pack_capacity:   # greedy packing: a sample that does not fit starts the next row
                    n = len(seqs[0][0])
                    if row and row_len + n > self.pack_capacity:
                        items.append({"packed": row})
                        row, row_len = [], 0
                        if len(items) == mbs:   # this sample is not in the batch: resume re-reads it
                            batch = self.collate_fn(items)
                            batch["stream_state"] = {"worker": w, "next": big_j}
                            items = []
                            yield batch
                    row.append(self.encoder.make_item(seqs, meta))
                    row_len += n
                    continue
                items.append(self.encoder.make_item(seqs, meta))
                if len(items) == mbs:
                    batch = self.collate_fn(items)
                    batch["stream_state"] = {"worker": w, "next": big_j + 1}
                    items = []
                    yield batch
            epoch, start = epoch + 1, 0


def build_streaming_datasets(cfg: DataConfig, processor, seq_length: int, *, micro_batch_size: int,
                             collate_fn, dp_rank: int, dp_size: int, num_workers: int, seed: int = 1234,
                             pack_capacity: int | None = None):
    """(streaming train set, map-style validation set or None). Validation with streaming comes
    from ``val_dataset`` (built map-style, capped by val_max_samples); val_rate is refused by
    config validation (a stream has no size to split)."""
    from omnitune.data.dataset import build_train_dataset, val_config

    train = StreamingSFTDataset(cfg, processor, seq_length, micro_batch_size=micro_batch_size,
                                collate_fn=collate_fn, dp_rank=dp_rank, dp_size=dp_size, num_workers=num_workers,
                                shuffle=cfg.dataloader_param.shuffle, seed=seed, pack_capacity=pack_capacity)
    b = cfg.dataset_param.basic_parameters
    if b.val_dataset is None:
        return train, None
    return train, build_train_dataset(val_config(cfg), processor, seq_length)
