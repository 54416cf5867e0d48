"""OpenAI's original GPT-2 release (a TensorFlow checkpoint + `hparams.json`) → our GPT, without TensorFlow.

The folder OpenAI's `download_model.py` fills holds `checkpoint`, `hparams.json`, `model.ckpt.index`,
`model.ckpt.data-00000-of-00001`, `model.ckpt.meta` (the graph, not needed here), `encoder.json` and
`vocab.bpe`. The weights are in TensorFlow's "tensor bundle" format (checkpoint V2):

- `<prefix>.index` is an SSTable — LevelDB's table file: blocks of sorted, prefix-compressed key/value
  entries, an index block pointing at them, and a 48-byte footer pointing at the index. The key "" holds a
  `BundleHeaderProto` (number of shards, byte order); every other key is a tensor name whose value is a
  `BundleEntryProto` (dtype, shape, shard id, byte offset and size in that shard).
- `<prefix>.data-00000-of-0000N` are the shards: each tensor's raw bytes, little-endian, row-major.

The two protobuf messages are decoded straight from the protobuf wire format, and the shards are memory-mapped,
so loading copies each weight at most once (the Conv1D transpose). Field numbers and layouts follow
TensorFlow's `tensor_bundle.proto`, `tensor_shape.proto`, `types.proto` and `lib/io/format.h`.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmscratch.config import ModelConfig
from llmscratch.errors import UserError, read_json_object
from llmscratch.weights.gpt2_layout import fill_gpt, name_map

HPARAMS = "hparams.json"
_TABLE_MAGIC = 0xDB4775248B80FB57  # last 8 bytes of every LevelDB / TensorFlow table file
_FOOTER = 48  # two block handles (varints, padded to 40 bytes) + the magic
_BLOCK_TRAILER = 5  # after each block: compression type (1 byte) + masked CRC32C (4 bytes)

# TensorFlow's DataType enum (types.proto) → the numpy dtype of the stored bytes and the torch dtype it is.
_DTYPES = {
    1: (np.float32, torch.float32),  # DT_FLOAT
    2: (np.float64, torch.float64),  # DT_DOUBLE
    3: (np.int32, torch.int32),  # DT_INT32
    9: (np.int64, torch.int64),  # DT_INT64
    14: (np.uint16, torch.bfloat16),  # DT_BFLOAT16: numpy has none, so read 16-bit words and reinterpret
    19: (np.float16, torch.float16),  # DT_HALF
}


# --- protobuf wire format ---------------------------------------------------------------------------------
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the base-128 varint at `pos`."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of each field of a protobuf message: an int for varint and fixed-width fields,
    bytes for length-delimited ones (strings, sub-messages)."""
    fields, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
            if len(value) != length:
                raise ValueError("truncated length-delimited field")
        elif wire == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        fields.append((number, value))
    return fields


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value  # protobuf encodes negative int64 in 10 bytes


@dataclass(frozen=True)
class BundleEntry:
    """Where one tensor lives (BundleEntryProto: 1 dtype, 2 shape, 3 shard_id, 4 offset, 5 size, 7 slices)."""

    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    sliced: bool  # a partitioned variable stored in slices: not used by GPT-2, not supported


def _entry(value: bytes) -> BundleEntry:
    dtype, shape, shard, offset, size, sliced = 0, (), 0, 0, 0, False
    for number, v in _fields(value):
        if number == 1:
            dtype = v
        elif number == 2:  # TensorShapeProto: 2 = repeated Dim (1 = size), 3 = unknown_rank
            shape = tuple(_int64(d) for n, dim in _fields(v) if n == 2 for m, d in _fields(dim) if m == 1)
        elif number == 3:
            shard = v
        elif number == 4:
            offset = _int64(v)
        elif number == 5:
            size = _int64(v)
        elif number == 7:
            sliced = True
    return BundleEntry(dtype, shape, shard, offset, size, sliced)


# --- the SSTable ------------------------------------------------------------------------------------------
def _block(data: bytes, handle: bytes, where: str) -> bytes:
    """The contents of the block a BlockHandle (varint offset, varint size) points at."""
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    if offset + size + _BLOCK_TRAILER > len(data):
        raise ValueError(f"{where} block at {offset}+{size} runs past the end of the file")
    if data[offset + size] != 0:  # 0 = stored as is; TensorFlow writes bundle indexes uncompressed
        raise ValueError(f"{where} block is compressed (type {data[offset + size]}), which this reader lacks")
    return data[offset : offset + size]


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs of a block. Each entry stores how many leading bytes its key shares with the previous
    key, then the rest of the key and the value; a restart array (uint32s + their count) ends the block."""
    (n_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * n_restarts
    entries, pos, key = [], 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        entries.append((key, block[pos : pos + value_len]))
        pos += value_len
    if pos != end:
        raise ValueError("block entries overrun the restart array")
    return entries


def read_index(path: Path) -> tuple[dict, dict[str, BundleEntry]]:
    """(header fields, tensor name → BundleEntry) of a tensor-bundle `.index` file."""
    data = path.read_bytes()
    try:
        if len(data) < _FOOTER or struct.unpack_from("<Q", data, len(data) - 8)[0] != _TABLE_MAGIC:
            raise ValueError("no table footer (not a TensorFlow checkpoint index, or truncated)")
        footer = data[-_FOOTER:]
        _, pos = _varint(footer, 0)  # the metaindex block handle: offset, size (TensorFlow leaves it empty)
        _, pos = _varint(footer, pos)
        index_handle = footer[pos:]
        entries: dict[str, BundleEntry] = {}
        header: dict = {}
        for _, handle in _block_entries(_block(data, index_handle, "index")):
            for key, value in _block_entries(_block(data, handle, "data")):
                if key == b"":
                    header = dict(_fields(value))
                else:
                    entries[key.decode("utf-8")] = _entry(value)
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the checkpoint index ({exc}); re-download the model files") from None
    return header, entries


# --- the folder -------------------------------------------------------------------------------------------
def checkpoint_prefix(folder: Path) -> Path:
    """The checkpoint's path prefix (…/model.ckpt): from the `checkpoint` file when there is one — only its
    file name counts, since TensorFlow may write an absolute path of the machine that saved it — else the
    single `*.index` file in the folder."""
    state = folder / "checkpoint"
    if state.is_file():
        m = re.search(r'^model_checkpoint_path:\s*"(.*)"', state.read_text(errors="replace"), re.MULTILINE)
        if m:
            prefix = folder / Path(m[1]).name
            if prefix.with_name(prefix.name + ".index").is_file():
                return prefix
    indexes = sorted(folder.glob("*.index"))
    if len(indexes) == 1:
        return indexes[0].with_suffix("")
    if not indexes:
        raise UserError(f"{folder}: no model.ckpt.index; point at the folder of OpenAI's GPT-2 files (checkpoint, "
                        "hparams.json, model.ckpt.index, model.ckpt.data-00000-of-00001)")
    raise UserError(f"{folder}: several *.index files ({', '.join(p.name for p in indexes)}) and no `checkpoint` "
                    "file saying which one to read")


def read_tensors(prefix: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the bundle at `prefix` (…/model.ckpt), memory-mapped from its data shards."""
    index = prefix.with_name(prefix.name + ".index")
    header, entries = read_index(index)
    n_shards = header.get(1, 1)
    if header.get(2, 0) != 0:
        raise UserError(f"{index}: the checkpoint was written big-endian; convert it on the machine that made it")
    shards: dict[int, np.memmap] = {}
    tensors = {}
    for name, e in entries.items():
        if e.sliced:
            raise UserError(f"{index}: tensor {name} is stored in slices (a partitioned variable), which this "
                            "reader does not support")
        if e.dtype not in _DTYPES:
            raise UserError(f"{index}: tensor {name} has TensorFlow dtype {e.dtype}, not a number type this "
                            "reader knows (float32/float16/bfloat16/float64/int32/int64)")
        np_dtype, torch_dtype = _DTYPES[e.dtype]
        count = int(np.prod(e.shape, dtype=np.int64))
        if count * np.dtype(np_dtype).itemsize != e.size or any(d < 0 for d in e.shape):
            raise UserError(f"{index}: tensor {name} has shape {e.shape} but {e.size} bytes; the index is damaged")
        if e.shard not in shards:
            shard = prefix.with_name(f"{prefix.name}.data-{e.shard:05d}-of-{n_shards:05d}")
            if not shard.is_file():
                raise UserError(f"{shard}: data shard missing; the checkpoint folder is incomplete")
            # Copy-on-write: the model may change its weights (training) without touching the file.
            empty = shard.stat().st_size == 0  # mmap refuses empty files
            shards[e.shard] = np.zeros(0, np.uint8) if empty else np.memmap(shard, dtype=np.uint8, mode="c")
        data = shards[e.shard]
        if e.offset + e.size > len(data):
            shard_name = f"{prefix.name}.data-{e.shard:05d}-of-{n_shards:05d}"
            raise UserError(f"{prefix.parent / shard_name}: has {len(data):,} bytes but tensor {name} ends at byte "
                            f"{e.offset + e.size:,}; the file is truncated — re-download it")
        array = np.frombuffer(data, dtype=np_dtype, count=count, offset=e.offset).reshape(e.shape)
        tensor = torch.from_numpy(array)
        tensors[name] = tensor.view(torch_dtype) if torch_dtype == torch.bfloat16 else tensor
    return tensors


def config_from_hparams(folder: Path) -> ModelConfig:
    """Our ModelConfig from OpenAI's `hparams.json` (n_vocab, n_ctx, n_embd, n_head, n_layer)."""
    path = folder / HPARAMS
    fields = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
    h = read_json_object(path, "missing; OpenAI's GPT-2 folder has hparams.json beside model.ckpt.index",
                         f"a JSON object with {', '.join(fields)}")
    missing = [k for k in fields if k not in h]
    if missing:
        raise UserError(f"{path}: missing field {missing[0]!r} (needs {', '.join(fields)})")
    try:
        # OpenAI's model.py: LayerNorm epsilon 1e-5, feed-forward width 4 * n_embd, head tied to wte.
        return ModelConfig(name="gpt2-openai", vocab_size=h["n_vocab"], context_length=h["n_ctx"],
                           d_model=h["n_embd"], n_layers=h["n_layer"], n_heads=h["n_head"], tie_embeddings=True,
                           norm_eps=1e-5)
    except UserError as exc:  # values ModelConfig rejects
        raise UserError(f"{path}: {exc}") from None


def load_openai_gpt2(folder: str | Path, dtype: torch.dtype | None = None):
    """(model, config) from a folder of OpenAI's GPT-2 release (`hparams.json` + `model.ckpt.*`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder; point at the folder of OpenAI's GPT-2 files")
    cfg = config_from_hparams(folder)
    prefix = checkpoint_prefix(folder)
    tensors = read_tensors(prefix)
    model = fill_gpt(cfg, tensors, name_map(cfg.n_layers, "openai"), f"{prefix}.index ({HPARAMS})", dtype)
    return model, cfg
