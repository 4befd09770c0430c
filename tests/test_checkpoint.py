"""Checkpoint loading: formats, dtypes, config variants and errors that name the culprit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from worker.backend import select_backend
from worker.checkpoint import load_checkpoint
from worker.kv_cache import plan_kv_cache
from worker.model_config import CheckpointError, load_model_config
from worker.random_checkpoint import write_checkpoint

CPU = select_backend("cpu")


@pytest.fixture
def model_copy(default_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(default_model, tmp_path / "model"))


def edit_config(model_dir: Path, **changes: object) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def rewrite_weights(model_dir: Path, change) -> None:  # type: ignore[no-untyped-def]
    tensors = load_file(str(model_dir / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(model_dir / "model.safetensors"))


def expect_error(model_dir: Path, *fragments: str) -> None:
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model_dir, CPU)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_missing_files_are_named(model_copy: Path, tmp_path: Path) -> None:
    expect_error(tmp_path / "nowhere", "does not exist")
    (model_copy / "tokenizer.json").rename(model_copy / "tok.bak")
    expect_error(model_copy, "missing file tokenizer.json")
    (model_copy / "tok.bak").rename(model_copy / "tokenizer.json")
    (model_copy / "model.safetensors").unlink()
    expect_error(model_copy, "missing file model.safetensors")
    (model_copy / "config.json").unlink()
    expect_error(model_copy, "missing file config.json")


def test_unsupported_architecture_and_fields(model_copy: Path) -> None:
    edit_config(model_copy, model_type="gpt2")
    expect_error(model_copy, "config.json", "unsupported model_type 'gpt2'", "llama")
    edit_config(model_copy, model_type="llama", hidden_size=None)
    expect_error(model_copy, "missing required field 'hidden_size'")
    edit_config(model_copy, hidden_size=256, rope_parameters={"rope_type": "yarn", "factor": 4.0})
    expect_error(model_copy, "unsupported rope type 'yarn'")


def test_missing_tensor_and_wrong_shape_are_named(model_copy: Path) -> None:
    rewrite_weights(model_copy, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    expect_error(model_copy, "missing tensor 'model.layers.2.mlp.up_proj.weight'")
    rewrite_weights(
        model_copy,
        lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((688, 255), np.float32)}),
    )
    expect_error(
        model_copy, "'model.layers.2.mlp.up_proj.weight' has shape (688, 255), expected (688, 256)"
    )


def test_untied_model_needs_lm_head(model_copy: Path) -> None:
    edit_config(model_copy, tie_word_embeddings=False)
    expect_error(model_copy, "missing tensor 'lm_head.weight'")


def test_sharded_checkpoint_loads_and_missing_shard_is_named(model_copy: Path) -> None:
    tensors = load_file(str(model_copy / "model.safetensors"))
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(model_copy / file))
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (model_copy / "model.safetensors").unlink()
    loaded = load_checkpoint(model_copy, CPU)
    np.testing.assert_array_equal(loaded.weights.embed, tensors["model.embed_tokens.weight"])
    (model_copy / "model-00002-of-00002.safetensors").unlink()
    expect_error(model_copy, "missing shard file model-00002-of-00002.safetensors")


@pytest.mark.parametrize("dtype", ["float16"])
def test_half_precision_weights_convert_to_float32(
    default_model: Path, tmp_path: Path, dtype: str
) -> None:
    half = load_checkpoint(write_checkpoint(tmp_path / dtype, "default", dtype=dtype), CPU).weights
    full = load_checkpoint(default_model, CPU).weights
    assert half.embed.dtype == np.float32
    tolerance = 2**-11  # half an ulp of fp16, relative
    np.testing.assert_allclose(half.layers[0].qkv, full.layers[0].qkv, rtol=tolerance, atol=1e-6)
    assert not np.array_equal(half.layers[0].qkv, full.layers[0].qkv)


def test_rope_theta_at_top_level_or_in_rope_parameters(model_copy: Path) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    edit_config(model_copy, rope_parameters=None, rope_theta=123.0, rope_scaling=scaling)
    old_style = load_model_config(model_copy).rope
    edit_config(
        model_copy,
        rope_theta=None,
        rope_scaling=None,
        rope_parameters={**scaling, "rope_theta": 123.0},
    )
    new_style = load_model_config(model_copy).rope
    assert old_style == new_style
    assert new_style.theta == 123.0 and new_style.rope_type == "llama3" and new_style.factor == 8.0


def test_eos_ids_from_generation_config_or_config(model_copy: Path) -> None:
    (model_copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7]}))
    assert load_model_config(model_copy).eos_token_ids == (0, 7)
    (model_copy / "generation_config.json").unlink()
    edit_config(model_copy, eos_token_id=3)
    assert load_model_config(model_copy).eos_token_ids == (3,)


def test_kv_capacity_grows_with_fewer_kv_heads(model_copy: Path) -> None:
    gqa = plan_kv_cache(load_model_config(model_copy), kv_cache_mb=8, block_size=16)
    assert (
        gqa.bytes_per_token == 2 * 4 * 2 * 32 * 4
    )  # K and V x layers x kv_heads x head_dim x fp32
    edit_config(model_copy, num_key_value_heads=8)
    mha = plan_kv_cache(load_model_config(model_copy), kv_cache_mb=8, block_size=16)
    edit_config(model_copy, num_key_value_heads=1)
    mqa = plan_kv_cache(load_model_config(model_copy), kv_cache_mb=8, block_size=16)
    assert mqa.capacity_tokens == 2 * gqa.capacity_tokens == 8 * mha.capacity_tokens
    assert "tokens" in gqa.describe()
