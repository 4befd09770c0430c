"""GGUF checkpoints: the same model as GGUF and as a Hugging Face directory gives the same logits.

Small synthetic files are written with `gguf.GGUFWriter`, from the same float weights
as a Hugging Face directory, with Q and K permuted the way llama.cpp's converter
(`LlamaModel.permute`) permutes them for llama, so equal logits prove the loader's
names, dimension order, dequantization and un-permutation. Quantized files are compared
with a directory of their dequantized weights: a row permutation commutes with
quantization, whose blocks run along a row. The real SmolLM2-135M-Instruct Q4_1 file
(tests/gguf_model.py) checks the tokenizer built from metadata and a greedy answer.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np
import pytest
from engine_probe import engine_logits
from gguf import GGMLQuantizationType as Q
from gguf_model import smollm2_gguf_fixture  # noqa: F401  (the `smollm2_gguf` fixture)
from safetensors.numpy import save_file

from worker.backend import select_backend
from worker.batch_processor import BatchProcessor, Request, run_to_completion
from worker.channel.types import EngineConfig, FinishReason, SamplingParams
from worker.checkpoint import Checkpoint, load_checkpoint
from worker.model_config import CheckpointError, RopeConfig
from worker.toy_tokenizer import build_tokenizer

CPU = select_backend("cpu")
ENGINE = EngineConfig(max_batch_size=4, kv_cache_mb=2, prefill_token_budget=32, device="cpu")


@dataclass(frozen=True)
class Tiny:
    arch: str = "llama"
    tied: bool = False
    qtype: Q = Q.F32  # of the 2-D weights; norms and biases stay F32, as llama.cpp writes them
    hidden: int = 64
    inter: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    theta: float = 10000.0
    llama3_rope: bool = False  # write Llama 3.1's rope_freqs.weight (factor 8, 1, 4, 8192)


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py `LlamaModel.permute`, as llama.cpp writes it."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def llama3_rope_factors(t: Tiny) -> np.ndarray:
    """What llama.cpp's LlamaModel.generate_extra_tensors writes as rope_freqs.weight."""
    factor, low, high, old = 8.0, 1.0, 4.0, 8192
    freqs = 1.0 / (t.theta ** (np.arange(0, t.head_dim, 2, dtype=np.float32) / t.head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# Hugging Face name inside a layer -> GGUF name (written out independently of the loader's).
LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_tensor_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight"}
    if hf.startswith("model.layers."):
        i, rest = hf.removeprefix("model.layers.").split(".", 1)
        return f"blk.{i}.{LAYER[rest]}"
    return top.get(hf, "output_norm.weight")


def roundtrip(w: np.ndarray, qtype: Q) -> np.ndarray:
    """The weights a reader of `qtype` gets back. Quantization blocks run along a row, so
    this commutes with llama.cpp's row permutation of Q and K."""
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)


def hf_weights(t: Tiny, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    q, kv, h = t.heads * t.head_dim, t.kv_heads * t.head_dim, t.hidden

    def rand(*shape: int, std: float = 0.08) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    w = {"model.embed_tokens.weight": rand(vocab, h, std=1.0), "model.norm.weight": 1 + rand(h)}
    if not t.tied:
        w["lm_head.weight"] = rand(vocab, h)
    for i in range(t.layers):
        p = f"model.layers.{i}."
        shapes = {
            "input_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q),
            "post_attention_layernorm.weight": (h,),
            "mlp.gate_proj.weight": (t.inter, h),
            "mlp.up_proj.weight": (t.inter, h),
            "mlp.down_proj.weight": (h, t.inter),
        }
        if t.arch == "qwen2":
            shapes.update(
                {f"self_attn.{x}_proj.bias": (n,) for x, n in zip("qkv", (q, kv, kv), strict=True)}
            )
        for name, shape in shapes.items():
            w[p + name] = 1 + rand(*shape) if "norm" in name else rand(*shape, std=0.3)
    return w


def toy_tokenizer_meta(vocab: int = 300) -> dict[str, object]:
    """worker/toy_tokenizer.py's byte-level BPE as GGUF "gpt2" metadata."""
    model = json.loads(build_tokenizer(vocab).to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    assert [model["vocab"][t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t.startswith("<|") else 1 for t in tokens],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": 0,
    }


SPM_PIECES = ["▁", *"abcdefghijklmnopqrstuvwxyz", "he", "▁t", "▁the", "at", "▁c", "▁cat", "in"]
SPM_PIECES += ["▁s", "▁sat", "on", "▁on", "▁a", "an"]


TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"


def spm_tokenizer_meta() -> dict[str, object]:
    """A SentencePiece-style "llama" vocabulary: specials, 256 byte tokens, scored pieces."""
    tokens = ["<unk>", "<s>", "</s>", "<|eot|>", *(f"<0x{b:02X}>" for b in range(256))]
    types = [2, 3, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    # sentencepiece scores: longer, later merges score lower than their parts' merges
    scores = [0.0] * len(tokens) + [-float(i) for i in range(len(SPM_PIECES))]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens + SPM_PIECES,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.eot_token_id": 3,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": TEMPLATE,
    }


def write_gguf(
    path: Path,
    t: Tiny,
    weights: dict[str, np.ndarray],
    tok_meta: dict[str, object],
    *,
    arch: str | None = None,
    drop: tuple[str, ...] = (),
    types: dict[str, Q] | None = None,
    extra: dict[str, object] | None = None,
    permute: bool = True,
) -> dict[str, np.ndarray]:
    """Write the GGUF; returns the weights a loader should see (dequantized), in HF layout."""
    a = t.arch
    meta: dict[str, object] = {
        f"{a}.block_count": t.layers,
        f"{a}.context_length": 256,
        f"{a}.embedding_length": t.hidden,
        f"{a}.feed_forward_length": t.inter,
        f"{a}.attention.head_count": t.heads,
        f"{a}.attention.head_count_kv": t.kv_heads,
        f"{a}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{a}.rope.freq_base": t.theta,
        "general.name": f"tiny-{a}",
        **({} if t.head_dim * t.heads == t.hidden else {f"{a}.attention.key_length": t.head_dim}),
        **tok_meta,
        **(extra or {}),
    }
    writer = gguf.GGUFWriter(str(path), arch or a)
    for key, value in meta.items():
        if key in drop:
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)  # type: ignore[arg-type]
    seen = {}
    for hf, w in weights.items():
        name = gguf_tensor_name(hf)
        qtype = (types or {}).get(name, t.qtype if w.ndim == 2 else Q.F32)
        seen[hf] = roundtrip(w, qtype)
        if permute and a == "llama" and ("q_proj" in hf or "k_proj" in hf):
            w = llama_cpp_permute(w, t.heads, t.kv_heads if "k_proj" in hf else None)
        if name not in drop:
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    if t.llama3_rope:
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(t))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return seen


def write_hf_dir(out: Path, t: Tiny, weights: dict[str, np.ndarray], vocab: int) -> Path:
    out.mkdir(parents=True)
    config = {
        "model_type": t.arch,
        "hidden_size": t.hidden,
        "intermediate_size": t.inter,
        "num_hidden_layers": t.layers,
        "num_attention_heads": t.heads,
        "num_key_value_heads": t.kv_heads,
        "head_dim": t.head_dim,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": t.theta,
        "tie_word_embeddings": t.tied,
        "vocab_size": vocab,
        "eos_token_id": 0,
        "hidden_act": "silu",
    }
    if t.llama3_rope:
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    (out / "config.json").write_text(json.dumps(config))
    save_file(weights, str(out / "model.safetensors"))
    build_tokenizer(300).save(str(out / "tokenizer.json"))
    return out


def logits(model: Path, tokens: list[int]) -> np.ndarray:
    processor = BatchProcessor(load_checkpoint(model, CPU), ENGINE, CPU)
    return engine_logits(processor, tokens, prefill_len=16, chunk=8)  # 2 chunks, then decodes


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


CASES = {
    "llama-f32": Tiny(),
    "llama-f16-tied": Tiny(qtype=Q.F16, tied=True),
    "llama-bf16": Tiny(qtype=Q.BF16),
    "llama-q8_0": Tiny(qtype=Q.Q8_0),
    "llama-q4_0-tied": Tiny(qtype=Q.Q4_0, tied=True),
    "llama-q4_1-mqa": Tiny(qtype=Q.Q4_1, kv_heads=1),
    "llama3-rope": Tiny(llama3_rope=True, theta=500000.0),
    "llama-head_dim32-q8_0": Tiny(qtype=Q.Q8_0, head_dim=32),
    "qwen2-f32-tied": Tiny(arch="qwen2", tied=True),
    "qwen2-q8_0": Tiny(arch="qwen2", qtype=Q.Q8_0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gguf_logits_equal_hf_directory(case: str, tmp_path: Path) -> None:
    t = CASES[case]
    meta = toy_tokenizer_meta() if t.arch == "llama" else spm_tokenizer_meta()
    vocab = len(meta["tokenizer.ggml.tokens"])  # type: ignore[arg-type]
    weights = hf_weights(t, vocab)
    seen = write_gguf(tmp_path / "m.gguf", t, weights, meta)
    hf = write_hf_dir(tmp_path / "hf", t, seen, vocab)
    tokens = np.random.default_rng(1).integers(0, vocab, 24).tolist()
    want = logits(hf, tokens)
    got = logits(tmp_path / "m.gguf", tokens)
    assert relative_error(got, want) <= 1e-4, relative_error(got, want)
    config = load_checkpoint(tmp_path / "m.gguf", CPU).config
    assert (config.model_type, config.tie_word_embeddings) == (t.arch, t.tied)
    assert config.qkv_bias == (t.arch == "qwen2")
    if t.llama3_rope:
        assert config.rope == RopeConfig(t.theta, "llama3", 8.0, 1.0, 4.0, 8192)
    if case == "llama-f32":  # the un-permutation matters: without it the logits differ
        write_gguf(tmp_path / "plain.gguf", t, weights, meta, permute=False)
        assert relative_error(logits(tmp_path / "plain.gguf", tokens), want) > 1e-2


def test_byte_level_tokenizer_matches_its_source(tmp_path: Path) -> None:
    """The "gpt2" tokenizer rebuilt from metadata encodes like the tokenizer.json it came from."""
    t = Tiny(layers=1)
    meta = toy_tokenizer_meta()
    write_gguf(tmp_path / "m.gguf", t, hf_weights(t, 300), meta)
    tok = load_checkpoint(tmp_path / "m.gguf", CPU).tokenizer
    source = build_tokenizer(300)
    for text in [
        "The quick brown fox.",
        "x = y + 1;\n\tprint(42)",
        "Zürich «très» 你好 🙂🚀",
        "  a  ",
    ]:
        assert tok.encode(text).ids == source.encode(text).ids
        assert tok.decode(tok.encode(text).ids) == text
    assert tok.encode("a<|endoftext|>b").tokens == ["a", "<|endoftext|>", "b"]
    assert tok.decode(tok.encode("a<|endoftext|>b").ids) == "ab"


def test_sentencepiece_tokenizer(tmp_path: Path) -> None:
    t = Tiny(arch="qwen2", layers=1)
    meta = spm_tokenizer_meta()
    write_gguf(tmp_path / "m.gguf", t, hf_weights(t, 300), meta)
    ckpt = load_checkpoint(tmp_path / "m.gguf", CPU)
    tok = ckpt.tokenizer
    encoding = tok.encode("the cat sat on a café")
    assert encoding.tokens[:6] == ["<s>", "▁the", "▁cat", "▁sat", "▁on", "▁a"]
    assert encoding.tokens[-3:] == ["f", "<0xC3>", "<0xA9>"]  # é by byte fallback
    assert tok.decode(encoding.ids) == "the cat sat on a café"  # BOS skipped, no leading space
    eot = tok.encode("in<|eot|>")
    assert eot.tokens == ["<s>", "▁", "in", "<|eot|>"]
    assert tok.decode(eot.ids) == "in"
    assert ckpt.config.eos_token_ids == (2, 3)  # EOS, then end of turn
    assert ckpt.chat_template is not None
    assert (ckpt.chat_template.bos_token, ckpt.chat_template.eos_token) == ("<s>", "</s>")


# -- errors name the key, tensor or type --------------------------------------------------
def expect_error(path: Path, *fragments: str) -> None:
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, CPU)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Callable[..., Path]:
    """write(name, **write_gguf options) -> the path of a 2-layer llama GGUF."""
    t = Tiny(layers=2)
    meta = toy_tokenizer_meta()
    weights = hf_weights(t, 300)

    def write(name: str = "m.gguf", **options: object) -> Path:
        write_gguf(tmp_path / name, t, weights, meta, **options)  # type: ignore[arg-type]
        return tmp_path / name

    return write


def test_truncated_file(tiny_gguf: Callable[..., Path]) -> None:
    path = tiny_gguf()
    data = path.read_bytes()
    for size in (len(data) - 100, len(data) // 2, 40, 3):
        path.write_bytes(data[:size])
        expect_error(path, str(path), "not a readable GGUF file")


def test_unknown_architecture(tiny_gguf: Callable[..., Path]) -> None:
    expect_error(tiny_gguf(arch="falcon"), "general.architecture 'falcon'", "llama, qwen2")


def test_unsupported_quantization_type(tiny_gguf: Callable[..., Path]) -> None:
    path = tiny_gguf(types={"blk.1.ffn_up.weight": Q.Q5_0})
    expect_error(path, "tensor 'blk.1.ffn_up.weight'", "unsupported type Q5_0", "Q4_1")


def test_missing_tensor_and_metadata(tiny_gguf: Callable[..., Path]) -> None:
    expect_error(
        tiny_gguf(drop=("blk.1.ffn_down.weight",)), "missing tensor 'blk.1.ffn_down.weight'"
    )
    expect_error(tiny_gguf(drop=("token_embd.weight",)), "missing tensor 'token_embd.weight'")
    for key in (
        "llama.feed_forward_length",
        "llama.attention.layer_norm_rms_epsilon",
        "llama.context_length",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.tokens",
    ):
        expect_error(tiny_gguf(drop=(key,)), f"missing metadata key '{key}'")


def test_rope_scaling_keys(tiny_gguf: Callable[..., Path]) -> None:
    linear = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}
    rope = load_checkpoint(tiny_gguf(extra=linear), CPU).config.rope
    assert (rope.rope_type, rope.factor) == ("linear", 2.0)
    yarn = {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}
    expect_error(tiny_gguf(extra=yarn), "llama.rope.scaling.type 'yarn'")


def test_model_path_dispatch(
    tiny_gguf: Callable[..., Path], tmp_path: Path, default_model: Path
) -> None:
    one = tmp_path / "one"
    one.mkdir()
    tiny_gguf().rename(one / "model.gguf")
    assert load_checkpoint(one, CPU).config.name == "tiny-llama"  # a directory with one .gguf
    shutil.copy(one / "model.gguf", one / "other.gguf")
    expect_error(one, "several GGUF files", "model.gguf, other.gguf")
    hf = Path(shutil.copytree(default_model, tmp_path / "hf"))
    shutil.copy(one / "model.gguf", hf / "model.gguf")  # config.json present: the HF loader
    assert load_checkpoint(hf, CPU).config.num_layers == 4
    expect_error(hf / "config.json", "not a model directory or a .gguf file")


# -- the real model: SmolLM2-135M-Instruct, Q4_1 ---------------------------------------
CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path) -> Checkpoint:
    return load_checkpoint(smollm2_gguf, CPU)


def test_smollm2_config_and_template(smollm2: Checkpoint) -> None:
    cfg = smollm2.config
    assert (cfg.model_type, cfg.vocab_size, cfg.num_layers, cfg.hidden_size) == (
        "llama",
        49152,
        30,
        576,
    )
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.tie_word_embeddings) == (
        9,
        3,
        64,
        True,
    )
    assert cfg.rope.theta == 100000.0 and cfg.max_position_embeddings == 8192
    assert 2 in cfg.eos_token_ids
    template = smollm2.chat_template
    assert template is not None and "<|im_start|>" in template.source
    assert template.eos_token == "<|im_end|>"


def test_smollm2_tokenizer(smollm2: Checkpoint) -> None:
    tok = smollm2.tokenizer
    assert tok.token_to_id("<|im_start|>") == 1 and tok.token_to_id("<|im_end|>") == 2
    # Ids of SmolLM2's own tokenizer.json (Hugging Face tokenizers), as other projects'
    # tests state them; the digits are split one by one, as its pre-tokenizer does.
    assert tok.encode("Hello, world!").ids == [19556, 28, 905, 17]
    assert tok.encode("The year 2026 had 365 days.").ids == [
        *(504, 713, 216, 34, 32, 34, 38, 761, 216, 35, 38, 37, 2009, 30)
    ]
    assert tok.encode("naïve café déjà vu").ids == [3546, 46494, 37366, 32564, 90, 16739, 386, 101]
    chat = tok.encode(CHAT)
    assert chat.tokens[:3] == ["<|im_start|>", "user", "Ċ"]
    assert chat.ids[:3] == [1, 4093, 198] and chat.ids[-4:] == [1, 520, 9531, 198]
    assert chat.ids.count(1) == 2 and chat.ids.count(2) == 1  # special tokens: one id each
    assert tok.decode(chat.ids, skip_special_tokens=False) == CHAT
    assert tok.decode(chat.ids) == "user\nWhat is the capital of France?\nassistant\n"
    for text in ["Hello, world!", "  spaced\ttext\n", "Zürich «très» naïve 你好，世界！ 🙂🚀"]:
        assert tok.decode(tok.encode(text).ids) == text


def test_smollm2_answers_greedily(smollm2: Checkpoint) -> None:
    processor = BatchProcessor(smollm2, replace(ENGINE, kv_cache_mb=8), CPU)
    prompt = smollm2.tokenizer.encode(CHAT).ids
    done = run_to_completion(processor, [Request("q", prompt, SamplingParams(max_new_tokens=48))])
    answer = smollm2.tokenizer.decode(done["q"].token_ids)
    assert "Paris" in answer, answer
    assert done["q"].finish_reason == FinishReason.EOS
