"""Read the records of an offline W&B run (``run-*.wandb``) back with wandb's own protobuf messages.

wandb 0.31 no longer ships its Python ``DataStore`` reader (the Go core writes the file), so the
container format is parsed here: a 7-byte header (``:W&B``, magic 0xBEE1, version), then
LevelDB-log records in 32 KiB blocks, each with a 7-byte header (crc32c, length, type:
1 full, 2 first, 3 middle, 4 last); the payloads are ``wandb_internal_pb2.Record`` messages.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time

BLOCK = 32768
HEADER = 7


def wandb_file(root: str) -> str:
    files = glob.glob(os.path.join(str(root), "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1, f"expected one offline run under {root}, found {files}"
    return files[0]


def payloads(path: str):
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, parts = HEADER, []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        pos += HEADER
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind == 1:
            yield chunk
        elif kind == 2:
            parts = [chunk]
        elif kind == 3:
            parts.append(chunk)
        elif kind == 4:
            parts.append(chunk)
            yield b"".join(parts)
            parts = []


def records(path: str):
    """Every ``Record`` of the run, parsed."""
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in payloads(path):
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def read_run(root: str, timeout: float = 30.0) -> dict:
    """Wait until the run's file is complete (wandb's core process may still be writing after
    ``wandb.finish()`` returns: an ``exit`` record is there and the size stopped changing), then read it.

    ``history`` (list of {key: decoded value}), ``alerts`` (Record.alert messages), ``metrics``
    (define_metric records), ``kinds`` (count of each record type)."""
    deadline = time.monotonic() + timeout
    while True:
        path = wandb_file(root)
        size = os.path.getsize(path)
        out = _read(path)
        time.sleep(0.3)
        if ("exit" in out["kinds"] and os.path.getsize(path) == size) or time.monotonic() > deadline:
            return out


def _read(path: str) -> dict:
    out = {"history": [], "alerts": [], "metrics": [], "kinds": {}}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        out["kinds"][kind] = out["kinds"].get(kind, 0) + 1
        if kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            out["history"].append(row)
        elif kind == "alert":
            out["alerts"].append(record.alert)
        elif kind == "metric":
            out["metrics"].append(record.metric)
    return out
