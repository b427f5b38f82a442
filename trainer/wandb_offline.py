"""Read offline W&B run files (`wandb/offline-run-*/run-<id>.wandb`) without the network.

wandb 0.31 writes these files from its Go core and ships no Python reader, so this module
decodes the format directly. Facts below were checked against files written by wandb 0.31.0:

- 7-byte file header: magic `:W&B`, u16 little-endian 0xBEE1, u8 version 0.
- Then a LevelDB-style log: 32 KiB blocks (counted from the start of the file, header
  included) of chunks `[crc32 u32 LE | length u16 LE | type u8] + payload`. Types:
  1 full, 2 first, 3 middle, 4 last. A block tail shorter than 7 bytes is zero padding.
- The checksum is plain zlib CRC-32 (IEEE, not CRC-32C, not masked) over the type byte
  followed by the payload.
- Each reassembled payload is a `wandb.proto.wandb_internal_pb2.Record`. History rows are
  `record.history.item[]` with either `key` or `nested_key` (a path: metric names such as
  `train/a/loss` are one element; logged dicts and media such as an image's `_type` are
  split per leaf) and a JSON-encoded `value_json`.

A run killed mid-write leaves a truncated last chunk; readers stop there quietly.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

MAGIC = b":W&B"
FILE_HEADER = struct.Struct("<4sHB")  # magic, 0xBEE1, version
FILE_IDENT = 0xBEE1
CHUNK_HEADER = struct.Struct("<IHB")  # crc32, payload length, chunk type
BLOCK_SIZE = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class CorruptRunFile(ValueError):
    """The file is not a W&B run file, or a chunk fails its checksum or framing."""


def iter_payloads(data: bytes, name: str = "<bytes>") -> Iterator[bytes]:
    """Reassembled record payloads of a whole `.wandb` file held in memory."""
    if len(data) < FILE_HEADER.size:
        return
    magic, ident, version = FILE_HEADER.unpack_from(data)
    if magic != MAGIC or ident != FILE_IDENT:
        raise CorruptRunFile(f"{name}: not a W&B run file (header {data[:7]!r})")
    if version != 0:
        raise CorruptRunFile(f"{name}: unsupported W&B log version {version}")

    pos = FILE_HEADER.size
    pending: list[bytes] | None = None  # parts of a record split across blocks
    while True:
        block_left = BLOCK_SIZE - pos % BLOCK_SIZE
        if block_left < CHUNK_HEADER.size:
            pos += block_left  # padding at the end of a block
            continue
        if pos + CHUNK_HEADER.size > len(data):
            return  # end of file (or a header cut short by a kill)
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:
            # Zero-filled space (pre-allocated or never written): the log ends here.
            return
        start = pos + CHUNK_HEADER.size
        end = start + length
        if end > len(data):
            return  # the last chunk was cut short by a kill
        if length > block_left - CHUNK_HEADER.size or kind not in (FULL, FIRST, MIDDLE, LAST):
            raise CorruptRunFile(f"{name}: bad chunk (type {kind}, length {length}) at byte {pos}")
        payload = data[start:end]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            raise CorruptRunFile(f"{name}: checksum mismatch at byte {pos}")
        pos = end

        if kind == FULL:
            if pending is not None:
                raise CorruptRunFile(f"{name}: unfinished record before byte {pos}")
            yield payload
        elif kind == FIRST:
            pending = [payload]
        elif pending is None:
            raise CorruptRunFile(f"{name}: continuation chunk without a start at byte {pos}")
        else:
            pending.append(payload)
            if kind == LAST:
                yield b"".join(pending)
                pending = None


def read_records(path: str | Path) -> Iterator[wandb_internal_pb2.Record]:
    """Every record of one `run-<id>.wandb` file, in write order."""
    path = Path(path)
    for payload in iter_payloads(path.read_bytes(), str(path)):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _item_key(item: Any) -> list[str]:
    """An item's key path: `key` if set, else `nested_key` (one element for flat names)."""
    return [item.key] if item.key else list(item.nested_key)


def _set_path(target: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = value


def _history_row(history: wandb_internal_pb2.HistoryRecord) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for item in history.item:
        # Logged dicts and media (images, tables) arrive as one item per leaf with a
        # multi-part path; rebuild the dict. Names with "/" are a single part.
        _set_path(row, _item_key(item), json.loads(item.value_json))
    return row


def find_offline_runs(run_dir: str | Path, run_id: str | None = None) -> list[Path]:
    """`run-*.wandb` files under a run directory, oldest first.

    `run_dir` may be the manytask run directory (holding `wandb/`), the `wandb/` directory
    itself, or one `offline-run-*` folder. A resumed run has one folder per process start;
    the folder name begins with its start time, so sorting by it orders the segments.
    `latest-run` is a symlink to one of them and is skipped.
    """
    run_dir = Path(run_dir)
    patterns = ["run-*.wandb", "*run-*/run-*.wandb", "wandb/*run-*/run-*.wandb"]
    files = {p for pattern in patterns for p in run_dir.glob(pattern)}
    files = {p for p in files if not p.parent.is_symlink()}
    if run_id is not None:
        files = {p for p in files if p.name == f"run-{run_id}.wandb"}

    def start_time(path: Path) -> str:
        # "offline-run-20261122_042914-abc" and "run-20261122_042914-abc" sort by time.
        return path.parent.name.split("run-", 1)[-1]

    return sorted(files, key=lambda p: (start_time(p), str(p)))


def _files(path_or_run_dir: str | Path) -> list[Path]:
    path = Path(path_or_run_dir)
    if path.is_file():
        return [path]
    files = find_offline_runs(path)
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file under {path}")
    return files


def read_history(path_or_run_dir: str | Path) -> list[dict[str, Any]]:
    """One dict per history row (`wandb.log` commit), values decoded from JSON.

    Rows keep W&B's own `_step`, `_timestamp`, `_runtime`; manytask rows also hold `step`.
    Given a directory, rows of every segment (resumes) are concatenated oldest first.
    """
    rows = []
    for file in _files(path_or_run_dir):
        for record in read_records(file):
            if record.WhichOneof("record_type") == "history":
                rows.append(_history_row(record.history))
    return rows


def _pop_path(target: dict[str, Any], keys: list[str]) -> None:
    for key in keys[:-1]:
        target = target.get(key)
        if not isinstance(target, dict):
            return
    target.pop(keys[-1], None)


def read_config(path_or_run_dir: str | Path) -> dict[str, Any]:
    """The run config as W&B stored it: `wandb.init(config=...)` plus later updates.

    W&B's own `_wandb` entry is left out. Given a directory, later segments override
    earlier ones.
    """
    config: dict[str, Any] = {}
    for file in _files(path_or_run_dir):
        for record in read_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                updates = record.run.config
            elif kind == "config":
                updates = record.config
            else:
                continue
            for item in updates.update:
                _set_path(config, _item_key(item), json.loads(item.value_json))
            for item in updates.remove:
                _pop_path(config, _item_key(item))
    config.pop("_wandb", None)
    return config
