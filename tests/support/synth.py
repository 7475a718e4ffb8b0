"""Write small synthetic llama-architecture GGUF files that llama-server can load.

Used by tests and `bench/estimate_accuracy.py`. Weights are random bytes with sane
scales (the numbers they produce are meaningless); the file carries an SPM
vocabulary with byte tokens and a ChatML chat template so that llama-server
starts and answers.

The tensor type of each block may differ (`block_types`), so estimators that
sum real per-block sizes can be checked against ones that divide the file size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_SUPPORTED = (
    gguf.GGMLQuantizationType.F32,
    gguf.GGMLQuantizationType.F16,
    gguf.GGMLQuantizationType.Q8_0,
)


@dataclass(frozen=True)
class SynthShape:
    """The shape and tensor types of a synthetic llama model."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    tensor_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F16
    block_types: tuple[gguf.GGMLQuantizationType, ...] | None = None
    """Per-block matrix types; overrides `tensor_type` for blocks when given."""
    output_type: gguf.GGMLQuantizationType | None = None
    """Type of `output.weight`; None means the same as `tensor_type`."""
    tied_output: bool = False
    """No `output.weight`: llama.cpp reuses `token_embd` for the output."""
    context_length: int = 8192

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def block_type(self, il: int) -> gguf.GGMLQuantizationType:
        if self.block_types is not None:
            return self.block_types[il]
        return self.tensor_type


# The shapes the accuracy bench and the real-server tests use.
SHAPES: tuple[SynthShape, ...] = (
    SynthShape("mha-f16", n_layer=4, n_embd=256, n_head=4, n_head_kv=4, n_ff=768, n_vocab=2048),
    SynthShape("gqa-f16", n_layer=6, n_embd=512, n_head=8, n_head_kv=2, n_ff=1536, n_vocab=4096),
    SynthShape(
        "mha-q8",
        n_layer=8,
        n_embd=512,
        n_head=8,
        n_head_kv=8,
        n_ff=1408,
        n_vocab=8192,
        tensor_type=gguf.GGMLQuantizationType.Q8_0,
    ),
    SynthShape(
        "gqa-q8",
        n_layer=12,
        n_embd=768,
        n_head=12,
        n_head_kv=4,
        n_ff=2048,
        n_vocab=8192,
        tensor_type=gguf.GGMLQuantizationType.Q8_0,
    ),
    SynthShape(
        "mqa-mixed",
        n_layer=6,
        n_embd=384,
        n_head=6,
        n_head_kv=1,
        n_ff=1024,
        n_vocab=3072,
        tensor_type=gguf.GGMLQuantizationType.Q8_0,
        block_types=(
            gguf.GGMLQuantizationType.F16,
            gguf.GGMLQuantizationType.F16,
            gguf.GGMLQuantizationType.Q8_0,
            gguf.GGMLQuantizationType.Q8_0,
            gguf.GGMLQuantizationType.F32,
            gguf.GGMLQuantizationType.Q8_0,
        ),
        output_type=gguf.GGMLQuantizationType.F16,
    ),
)

LARGER = SynthShape(
    "llama-16l-q8",
    n_layer=16,
    n_embd=1024,
    n_head=16,
    n_head_kv=4,
    n_ff=2816,
    n_vocab=32000,
    tensor_type=gguf.GGMLQuantizationType.Q8_0,
)
"""A 250 MB shape with a realistic vocabulary, for the GPU measurements (bench/gpu_memory.py)."""


def shape_by_name(name: str) -> SynthShape:
    for shape in (*SHAPES, LARGER):
        if shape.name == name:
            return shape
    raise KeyError(name)


def _vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    special = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = [
        gguf.TokenType.UNKNOWN,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
    ]
    tokens = list(special)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    pieces = ["\u2581" + c for c in "abcdefghijklmnopqrstuvwxyz"] + list("abcdefghijklmnopqrstuvwxyz")
    i = 0
    while len(tokens) < n_vocab:
        tokens.append(pieces[i] if i < len(pieces) else f"\u2581w{i}")
        types.append(gguf.TokenType.NORMAL)
        i += 1
    if len(tokens) > n_vocab:
        raise ValueError(f"n_vocab must be at least {len(tokens)}")
    scores = [0.0] * len(special) + [-1000.0] * 256 + [-float(j) for j in range(n_vocab - 261)]
    return tokens, scores, [int(t) for t in types]


def _matrix(
    rng: np.random.Generator, n_in: int, n_out: int, qtype: gguf.GGMLQuantizationType
) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """Random weights for a matrix of ggml shape [n_in, n_out] (numpy shape (n_out, n_in))."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return (rng.standard_normal((n_out, n_in), dtype=np.float32) * 0.02), None
    if qtype == gguf.GGMLQuantizationType.F16:
        return (rng.standard_normal((n_out, n_in), dtype=np.float32) * 0.02).astype(np.float16), None
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        if n_in % 32:
            raise ValueError(f"Q8_0 rows must be a multiple of 32, got {n_in}")
        n_blocks = n_out * n_in // 32
        blocks = np.empty((n_blocks, 34), dtype=np.uint8)
        blocks[:, 0:2] = np.full(n_blocks, 0.0005, dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
        blocks[:, 2:] = rng.integers(0, 256, size=(n_blocks, 32), dtype=np.uint8)
        return blocks.reshape(n_out, n_in // 32 * 34), gguf.GGMLQuantizationType.Q8_0
    raise ValueError(f"unsupported tensor type {qtype.name}; use one of {[t.name for t in _SUPPORTED]}")


def write_synth_gguf(path: str | Path, shape: SynthShape, seed: int = 0) -> Path:
    """Write `shape` as a llama-architecture GGUF at `path` and return the path."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    e, hd = shape.n_embd, shape.head_dim
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"synth-{shape.name}")
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(e)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_rope_dimension_count(hd)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    writer.add_vocab_size(shape.n_vocab)
    tokens, scores, types = _vocab(shape.n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(4)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    def add(name: str, n_in: int, n_out: int, qtype: gguf.GGMLQuantizationType) -> None:
        data, raw = _matrix(rng, n_in, n_out, qtype)
        writer.add_tensor(name, data, raw_dtype=raw)

    def add_norm(name: str) -> None:
        writer.add_tensor(name, np.ones(e, dtype=np.float32))

    add("token_embd.weight", e, shape.n_vocab, shape.tensor_type)
    add_norm("output_norm.weight")
    if not shape.tied_output:
        add("output.weight", e, shape.n_vocab, shape.output_type or shape.tensor_type)
    for il in range(shape.n_layer):
        t = shape.block_type(il)
        add_norm(f"blk.{il}.attn_norm.weight")
        add(f"blk.{il}.attn_q.weight", e, shape.n_head * hd, t)
        add(f"blk.{il}.attn_k.weight", e, shape.n_head_kv * hd, t)
        add(f"blk.{il}.attn_v.weight", e, shape.n_head_kv * hd, t)
        add(f"blk.{il}.attn_output.weight", shape.n_head * hd, e, t)
        add_norm(f"blk.{il}.ffn_norm.weight")
        add(f"blk.{il}.ffn_gate.weight", e, shape.n_ff, t)
        add(f"blk.{il}.ffn_up.weight", e, shape.n_ff, t)
        add(f"blk.{il}.ffn_down.weight", shape.n_ff, e, t)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
