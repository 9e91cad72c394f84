#!/usr/bin/env python3
"""Generate small random-weight Hugging Face Qwen3, Qwen3-MoE and GLM-4-MoE checkpoints plus
transformers reference outputs under tests/fixtures/<name>/, so the Rust tests need no Python.

Usage:
    python3 scripts/make_fixtures.py            # all fixtures
    python3 scripts/make_fixtures.py --only qwen3-tied-hub

Deterministic: fixed seeds, single-threaded CPU torch, float32 compute; running it
twice produces byte-identical files. See scripts/README.md for the file formats.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES_DIR = REPO_ROOT / "tests" / "fixtures"

PROMPT_LEN = 8
NUM_STEPS = 4
MAX_NEW_TOKENS = 32

# Special token ids, mirroring Qwen3's layout (<|endoftext|> = bos = pad, <|im_end|> = eos).
BOS_ID = 2  # "<|endoftext|>"
EOS_ID = 1  # "<|im_end|>"
GEN_EOS_IDS = [1, 2]
PAD_ID = 2

# Acceptance criteria for a random-weight candidate (otherwise the next seed is tried).
MIN_MARGIN = 0.02  # min gap between top-1 and top-2 logit at every greedy decision
MIN_LOGIT_STD = 0.5  # logits must have a decent spread over the vocab
MIN_DISTINCT_GENERATED = 6  # avoid degenerate "same token forever" generations
MAX_SEED_TRIES = 64
# Sliding-window fixtures: full attention must move some logit past the window by this much.
MIN_WINDOW_EFFECT = 0.1

# Tolerances for the internal sanity checks (all float32 on CPU).
ATOL = 1e-4
RTOL = 1e-4

HUB_TRANSFORMERS_VERSION = "4.51.0"  # what real Qwen3 hub checkpoints were saved with
GLM_HUB_TRANSFORMERS_VERSION = "4.54.0"  # what zai-org/GLM-4.5(-Air) config.json files carry

# MoE-only acceptance criteria (checked on the float64 NumPy routing, over every token that
# the reference runs through the model: prompt + all greedy-generated inputs).
MIN_ROUTE_MARGIN = 1e-3  # gap between the k-th and (k+1)-th selection score (and group score)
MIN_EXPERT_COVERAGE = 0.5  # fraction of experts chosen somewhere in the prompt, per MoE layer

FIXTURES = {
    # Hub style (rope_theta / rope_scaling at top level, torch_dtype), tied embeddings,
    # bf16 weights in one file.
    "qwen3-tied-hub": dict(
        seed=1002,
        config=dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
        rope_theta=1000000,
        config_style="hub",
        storage_dtype=torch.bfloat16,
        shards=1,
    ),
    # transformers-5 style config (rope_parameters), untied lm_head, GQA ratio 4,
    # head_dim != hidden / heads, fp32 weights in two shards + index.
    "qwen3-untied-rp": dict(
        seed=2004,
        config=dict(
            vocab_size=384,
            hidden_size=96,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=64,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
        rope_theta=10000,
        config_style="transformers5",
        storage_dtype=torch.float32,
        shards=2,
    ),
    # Hub style, untied, no GQA (ratio 1), fp16 weights in one file.
    "qwen3-fp16": dict(
        seed=3002,
        config=dict(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=8,
            head_dim=32,
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        ),
        rope_theta=500000,
        config_style="hub",
        storage_dtype=torch.float16,
        shards=1,
    ),
    # Hub style with sliding-window attention: window 8 on layers >= max_window_layers (1, 2),
    # and a 20-token prompt, so the prefill, the cached steps and the greedy tokens all reach
    # past the window (where full attention would give other logits; checked when it is made).
    "qwen3-sliding": dict(
        seed=8002,
        config=dict(
            vocab_size=384,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=1,
        ),
        rope_theta=10000,
        config_style="hub",
        storage_dtype=torch.bfloat16,
        shards=1,
        prompt_len=20,
    ),
    # ---- Mixture-of-experts fixtures (family != "qwen3"); see scripts/README.md. ----
    # Qwen3-MoE, Hub style, untied, bf16; layer 1 is a dense MLP through mlp_only_layers.
    "qwen3moe-a": dict(
        family="qwen3_moe",
        seed=4024,
        config=dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        ),
        rope_theta=1000000,
        config_style="hub",
        storage_dtype=torch.bfloat16,
        shards=1,
    ),
    # Qwen3-MoE, transformers-5 style, tied, f32 in 2 shards; decoder_sparse_step 2 (layers
    # 1 and 3 sparse), 6 experts top-3, no top-k renormalisation.
    "qwen3moe-b": dict(
        family="qwen3_moe",
        seed=5004,
        config=dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            num_experts=6,
            num_experts_per_tok=3,
            norm_topk_prob=False,
            decoder_sparse_step=2,
            mlp_only_layers=[],
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
        rope_theta=500000,
        config_style="transformers5",
        storage_dtype=torch.float32,
        shards=2,
    ),
    # GLM-4.5-style MoE, Hub style, bf16 (router bias stored f32 like the real checkpoints),
    # qk-norm, qkv bias, partial rotary 0.5, 2 expert groups (top-1 group), 1 shared expert,
    # first layer dense, routed_scaling_factor 2.5, plus one MTP layer (model.layers.4.*)
    # that transformers ignores and the Rust loader must skip.
    "glm4moe-a": dict(
        family="glm4_moe",
        seed=6055,
        config=dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            attention_bias=True,
            use_qk_norm=True,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            num_nextn_predict_layers=1,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
        partial_rotary_factor=0.5,
        rope_theta=1000000,
        config_style="hub",
        storage_dtype=torch.bfloat16,
        shards=1,
    ),
    # GLM-4-MoE, transformers-5 style, f32; no qk-norm, no bias, full rotary (factor 1.0),
    # 1 group, 2 shared experts, every layer MoE, no renormalisation, scaling 1.0, GQA 4, no MTP.
    "glm4moe-b": dict(
        family="glm4_moe",
        seed=7004,
        config=dict(
            vocab_size=384,
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=32,
            attention_bias=False,
            use_qk_norm=False,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_group=1,
            topk_group=1,
            n_shared_experts=2,
            first_k_dense_replace=0,
            routed_scaling_factor=1.0,
            norm_topk_prob=False,
            num_nextn_predict_layers=0,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
        partial_rotary_factor=1.0,
        rope_theta=10000,
        config_style="transformers5",
        storage_dtype=torch.float32,
        shards=1,
    ),
}

FAMILIES = {
    # family: (config class, model class, architecture name)
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, "Qwen3ForCausalLM"),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, "Qwen3MoeForCausalLM"),
    "glm4_moe": (Glm4MoeConfig, Glm4MoeForCausalLM, "Glm4MoeForCausalLM"),
}


def family_of(spec: dict) -> str:
    return spec.get("family", "qwen3")

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# --------------------------------------------------------------------------------------
# Config / generation-config writers
# --------------------------------------------------------------------------------------


def hub_config_dict(spec: dict) -> dict:
    """config.json as shipped by real Hub Qwen3 checkpoints (e.g. Qwen/Qwen3-4B-Instruct-2507):
    rope_theta and rope_scaling (null) at the top level, torch_dtype, no rope_parameters."""
    if family_of(spec) == "qwen3_moe":
        return hub_config_dict_qwen3_moe(spec)
    if family_of(spec) == "glm4_moe":
        return hub_config_dict_glm4_moe(spec)
    c = spec["config"]
    d = {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "head_dim": c["head_dim"],
        "hidden_act": "silu",
        "hidden_size": c["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": c["intermediate_size"],
        "max_position_embeddings": c["max_position_embeddings"],
        "max_window_layers": c.get("max_window_layers", c["num_hidden_layers"]),
        "model_type": "qwen3",
        "num_attention_heads": c["num_attention_heads"],
        "num_hidden_layers": c["num_hidden_layers"],
        "num_key_value_heads": c["num_key_value_heads"],
        "rms_norm_eps": c["rms_norm_eps"],
        "rope_scaling": None,
        "rope_theta": spec["rope_theta"],
        "sliding_window": c.get("sliding_window"),
        "tie_word_embeddings": c["tie_word_embeddings"],
        "torch_dtype": DTYPE_NAMES[spec["storage_dtype"]],
        "transformers_version": HUB_TRANSFORMERS_VERSION,
        "use_cache": True,
        "use_sliding_window": c.get("use_sliding_window", False),
        "vocab_size": c["vocab_size"],
    }
    return d


def hub_config_dict_qwen3_moe(spec: dict) -> dict:
    """config.json as shipped by Qwen/Qwen3-30B-A3B (transformers 4.51): rope_theta (a float
    there) and rope_scaling null at the top level, torch_dtype, router_aux_loss_coef."""
    c = spec["config"]
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "decoder_sparse_step": c["decoder_sparse_step"],
        "eos_token_id": EOS_ID,
        "head_dim": c["head_dim"],
        "hidden_act": "silu",
        "hidden_size": c["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": c["intermediate_size"],
        "max_position_embeddings": c["max_position_embeddings"],
        "max_window_layers": c["num_hidden_layers"],
        "mlp_only_layers": c["mlp_only_layers"],
        "model_type": "qwen3_moe",
        "moe_intermediate_size": c["moe_intermediate_size"],
        "norm_topk_prob": c["norm_topk_prob"],
        "num_attention_heads": c["num_attention_heads"],
        "num_experts": c["num_experts"],
        "num_experts_per_tok": c["num_experts_per_tok"],
        "num_hidden_layers": c["num_hidden_layers"],
        "num_key_value_heads": c["num_key_value_heads"],
        "output_router_logits": False,
        "rms_norm_eps": c["rms_norm_eps"],
        "rope_scaling": None,
        "rope_theta": float(spec["rope_theta"]),
        "router_aux_loss_coef": 0.001,
        "sliding_window": None,
        "tie_word_embeddings": c["tie_word_embeddings"],
        "torch_dtype": DTYPE_NAMES[spec["storage_dtype"]],
        "transformers_version": HUB_TRANSFORMERS_VERSION,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": c["vocab_size"],
    }


def hub_config_dict_glm4_moe(spec: dict) -> dict:
    """config.json in the layout of zai-org/GLM-4.5 / GLM-4.5-Air (transformers 4.54):
    partial_rotary_factor and rope_theta (an integer) at the top level, no rope_parameters,
    no bos_token_id, eos_token_id a list, pad_token_id set, torch_dtype."""
    c = spec["config"]
    return {
        "architectures": ["Glm4MoeForCausalLM"],
        "attention_bias": c["attention_bias"],
        "attention_dropout": 0.0,
        "pad_token_id": PAD_ID,
        "eos_token_id": GEN_EOS_IDS,
        "head_dim": c["head_dim"],
        "hidden_act": "silu",
        "hidden_size": c["hidden_size"],
        "partial_rotary_factor": spec["partial_rotary_factor"],
        "initializer_range": 0.02,
        "intermediate_size": c["intermediate_size"],
        "max_position_embeddings": c["max_position_embeddings"],
        "model_type": "glm4_moe",
        "moe_intermediate_size": c["moe_intermediate_size"],
        "norm_topk_prob": c["norm_topk_prob"],
        "num_attention_heads": c["num_attention_heads"],
        "n_group": c["n_group"],
        "topk_group": c["topk_group"],
        "n_routed_experts": c["n_routed_experts"],
        "n_shared_experts": c["n_shared_experts"],
        "routed_scaling_factor": c["routed_scaling_factor"],
        "num_experts_per_tok": c["num_experts_per_tok"],
        "first_k_dense_replace": c["first_k_dense_replace"],
        "num_hidden_layers": c["num_hidden_layers"],
        "num_key_value_heads": c["num_key_value_heads"],
        "rms_norm_eps": c["rms_norm_eps"],
        "rope_theta": spec["rope_theta"],
        "num_nextn_predict_layers": c["num_nextn_predict_layers"],
        "tie_word_embeddings": c["tie_word_embeddings"],
        "torch_dtype": DTYPE_NAMES[spec["storage_dtype"]],
        "transformers_version": GLM_HUB_TRANSFORMERS_VERSION,
        "use_cache": True,
        "use_qk_norm": c["use_qk_norm"],
        "vocab_size": c["vocab_size"],
    }


def expected_rope_parameters(spec: dict) -> dict:
    rp = {"rope_type": "default", "rope_theta": float(spec["rope_theta"])}
    if family_of(spec) == "glm4_moe":
        rp["partial_rotary_factor"] = float(spec["partial_rotary_factor"])
    return rp


def make_config(spec: dict):
    if family_of(spec) == "qwen3":
        return make_qwen3_config(spec)
    c = dict(spec["config"])
    cls = FAMILIES[family_of(spec)][0]
    return cls(
        **c,
        hidden_act="silu",
        rope_parameters=expected_rope_parameters(spec),
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def make_qwen3_config(spec: dict) -> Qwen3Config:
    c = {"use_sliding_window": False, **spec["config"]}
    cfg = Qwen3Config(
        **c,
        hidden_act="silu",
        attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(spec["rope_theta"])},
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    return cfg


def write_config(spec: dict, cfg: Qwen3Config, out: Path) -> None:
    if spec["config_style"] == "hub":
        write_json_pretty(hub_config_dict(spec), out / "config.json")
    elif spec["config_style"] == "transformers5":
        # Exactly what transformers 5 itself writes (model.save_pretrained).
        cls, _, arch = FAMILIES[family_of(spec)]
        cfg = cls.from_dict(cfg.to_dict())
        cfg.architectures = [arch]
        cfg.dtype = DTYPE_NAMES[spec["storage_dtype"]]
        cfg.save_pretrained(out)
        d = json.loads((out / "config.json").read_text())
        assert "rope_theta" not in d and "rope_scaling" not in d, d
        assert "partial_rotary_factor" not in d, d
        assert d["rope_parameters"] == expected_rope_parameters(spec), d
    else:
        raise ValueError(spec["config_style"])


def write_generation_config(spec: dict, out: Path) -> None:
    version = HUB_TRANSFORMERS_VERSION if spec["config_style"] == "hub" else transformers.__version__
    d = {
        "bos_token_id": BOS_ID,
        "do_sample": True,
        "eos_token_id": GEN_EOS_IDS,
        "pad_token_id": PAD_ID,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
        "transformers_version": version,
    }
    write_json_pretty(d, out / "generation_config.json")


def write_json_pretty(d: dict, path: Path) -> None:
    path.write_text(json.dumps(d, indent=2) + "\n")


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------


def build_random_model(spec: dict, seed: int) -> Qwen3ForCausalLM:
    if family_of(spec) != "qwen3":
        return build_random_moe_model(spec, seed)
    cfg = make_qwen3_config(spec)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).to(torch.float32)
    # Re-initialize everything so logits are not degenerate: matrices ~ N(0, 0.2),
    # norm weights ~ 1 + N(0, 0.1) so that they actually matter.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def build_random_moe_model(spec: dict, seed: int):
    """Same recipe as the dense Qwen3 fixtures, plus: attention biases ~ N(0, 0.2) (not 1 +
    N(0, 0.1) like norm weights), and the GLM router bias buffer e_score_correction_bias
    ~ N(0, 0.25) (non-zero, so biased choice != unbiased choice)."""
    cfg = make_config(spec)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = FAMILIES[family_of(spec)][1](cfg).to(torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        for name, b in sorted(model.named_buffers(), key=lambda kv: kv[0]):
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.25 * torch.randn(b.shape, generator=g))
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def natural_key(name: str):
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in name.split(".")]


def moe_tensor_order_key(name: str):
    """Like tensor_order_key, but with numeric expert indices sorted numerically."""
    parts = name.split(".")
    if name.startswith("model.embed_tokens"):
        return (0, 0, natural_key(name))
    if name.startswith("model.layers."):
        return (1, int(parts[2]), natural_key(name))
    if name.startswith("model.norm"):
        return (2, 0, natural_key(name))
    return (3, 0, natural_key(name))


def unfuse_experts(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers-5 in-memory layout -> Hub checkpoint layout (the reverse of its
    qwen2_moe conversion): mlp.experts.gate_up_proj [E, 2I, H] (gate rows first, then up
    rows) -> mlp.experts.{e}.gate_proj.weight [I, H] and .up_proj.weight [I, H];
    mlp.experts.down_proj [E, H, I] -> mlp.experts.{e}.down_proj.weight [H, I]."""
    out = {}
    for name, t in sd.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            pre = name[: -len("gate_up_proj")]
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{pre}{e}.gate_proj.weight"] = t[e, :inter]
                out[f"{pre}{e}.up_proj.weight"] = t[e, inter:]
        elif name.endswith("mlp.experts.down_proj"):
            pre = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{pre}{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    return out


def fuse_experts(tensors: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Hub checkpoint layout -> transformers-5 in-memory layout (inverse of unfuse_experts)."""
    out = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if ".mlp.experts." in name and parts[-2] in ("gate_proj", "up_proj", "down_proj"):
            pre = ".".join(parts[:-3]) + "."
            e = int(parts[-3])
            if parts[-2] == "down_proj":
                out.setdefault(pre + "down_proj", [None] * num_experts)[e] = t
            else:
                d = out.setdefault(pre + "gate_up_proj", [[None, None] for _ in range(num_experts)])
                d[e][0 if parts[-2] == "gate_proj" else 1] = t
        else:
            out[name] = t
    for name in list(out):
        if name.endswith("gate_up_proj"):
            out[name] = torch.stack([torch.cat(gu, 0) for gu in out[name]])
        elif name.endswith("experts.down_proj"):
            out[name] = torch.stack(out[name])
    return out


def mtp_tensors(spec: dict, seed: int, model) -> dict[str, torch.Tensor]:
    """Tensors of the GLM-4.5 multi-token-prediction (MTP / "nextn") layers, which
    transformers 5 neither builds nor saves (Glm4MoeForCausalLM has no MTP module; on load
    they are reported as UNEXPECTED and dropped). Real zai-org/GLM-4.5 checkpoints store
    them as model.layers.{num_hidden_layers + i}.*: eh_proj [H, 2H], enorm, hnorm,
    shared_head.norm, shared_head.head [V, H], embed_tokens [V, H], plus the tensors of a
    full MoE decoder layer (copied here from the shapes of the last real layer)."""
    c = spec["config"]
    n = c.get("num_nextn_predict_layers", 0)
    if n == 0:
        return {}
    H, V = c["hidden_size"], c["vocab_size"]
    g = torch.Generator().manual_seed(seed + 1000)
    sd = unfuse_experts({k: v for k, v in model.state_dict().items()})
    last = c["num_hidden_layers"] - 1
    out = {}
    for i in range(n):
        idx = c["num_hidden_layers"] + i
        shapes = {
            "eh_proj.weight": (H, 2 * H),
            "enorm.weight": (H,),
            "hnorm.weight": (H,),
            "shared_head.norm.weight": (H,),
            "shared_head.head.weight": (V, H),
            "embed_tokens.weight": (V, H),
        }
        pre_last = f"model.layers.{last}."
        for k in sorted(sd):
            if k.startswith(pre_last):
                shapes[k[len(pre_last):]] = tuple(sd[k].shape)
        for k in sorted(shapes):
            shape = shapes[k]
            if k.endswith("e_score_correction_bias") or k.endswith(".bias"):
                t = 0.2 * torch.randn(shape, generator=g)
            elif len(shape) == 1:
                t = 1.0 + 0.1 * torch.randn(shape, generator=g)
            else:
                t = 0.2 * torch.randn(shape, generator=g)
            out[f"model.layers.{idx}.{k}"] = t
    return out


def tensor_order_key(name: str):
    """Natural checkpoint order: embed, layers by index, final norm, lm_head."""
    parts = name.split(".")
    if name.startswith("model.embed_tokens"):
        return (0, 0, name)
    if name.startswith("model.layers."):
        return (1, int(parts[2]), name)
    if name.startswith("model.norm"):
        return (2, 0, name)
    return (3, 0, name)


def checkpoint_tensors_moe(model, spec: dict, seed: int) -> dict[str, torch.Tensor]:
    sd = unfuse_experts(dict(model.state_dict()))
    sd.update(mtp_tensors(spec, seed, model))
    tied = spec["config"]["tie_word_embeddings"]
    out = {}
    for name in sorted(sd, key=moe_tensor_order_key):
        if tied and name == "lm_head.weight":
            continue
        dtype = spec["storage_dtype"]
        if name.endswith("e_score_correction_bias"):
            dtype = torch.float32  # GLM-4.5 checkpoints keep the router bias in F32
        out[name] = sd[name].detach().to(dtype).contiguous().clone()
    return out


def checkpoint_tensors(model: Qwen3ForCausalLM, spec: dict) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    tied = spec["config"]["tie_word_embeddings"]
    out = {}
    for name in sorted(sd, key=tensor_order_key):
        if tied and name == "lm_head.weight":
            continue  # tied checkpoints on the Hub do not store lm_head
        out[name] = sd[name].detach().to(spec["storage_dtype"]).contiguous().clone()
    return out


def write_weights(tensors: dict[str, torch.Tensor], spec: dict, out: Path) -> None:
    meta = {"format": "pt"}
    n = spec["shards"]
    if n == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata=meta)
        return
    names = list(tensors)  # already in natural order
    sizes = [tensors[k].numel() * tensors[k].element_size() for k in names]
    total = sum(sizes)
    # Greedy contiguous split into n shards of roughly equal byte size.
    shards: list[list[str]] = [[] for _ in range(n)]
    acc = 0
    for name, size in zip(names, sizes):
        idx = min(n - 1, int(acc * n // total))
        shards[idx].append(name)
        acc += size
    assert all(shards), "empty shard"
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k] for k in shard}, str(out / fname), metadata=meta)
        for k in shard:
            weight_map[k] = fname
    index = {
        "metadata": {"total_size": total},
        "weight_map": {k: weight_map[k] for k in sorted(weight_map)},
    }
    write_json_pretty(index, out / "model.safetensors.index.json")


# --------------------------------------------------------------------------------------
# Reference computation (from the folder on disk)
# --------------------------------------------------------------------------------------


def load_from_folder(folder: Path) -> Qwen3ForCausalLM:
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    assert isinstance(model, Qwen3ForCausalLM), type(model)
    return model


def load_moe_from_folder(folder: Path, spec: dict, experts_implementation: str = "eager"):
    """Loads with eager attention and (by default) the eager per-expert loop, which is the
    reference semantics; returns (model, unexpected keys)."""
    model, info = AutoModelForCausalLM.from_pretrained(
        str(folder),
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation=experts_implementation,
        output_loading_info=True,
    )
    model.eval()
    assert type(model) is FAMILIES[family_of(spec)][1], type(model)
    assert model.config._experts_implementation == experts_implementation
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"], info
    return model, set(info["unexpected_keys"])


def check_loaded_moe(model, unexpected: set[str], tensors: dict[str, torch.Tensor], spec: dict) -> None:
    cfg = model.config
    c = spec["config"]
    assert cfg.rope_parameters == expected_rope_parameters(spec), cfg.rope_parameters
    for k, v in c.items():
        assert getattr(cfg, k) == v, (k, getattr(cfg, k), v)
    # Rotary inverse frequencies over the rotary dims only (GLM: partial rotary).
    hd = c["head_dim"]
    rd = int(hd * spec.get("partial_rotary_factor", 1.0))
    expected_inv = 1.0 / (float(spec["rope_theta"]) ** (torch.arange(0, rd, 2, dtype=torch.int64).float() / rd))
    assert torch.allclose(model.model.rotary_emb.inv_freq.float(), expected_inv), "inv_freq mismatch"
    # Which layers are sparse.
    for i, layer in enumerate(model.model.layers):
        sparse = hasattr(layer.mlp, "experts")
        assert sparse == layer_is_sparse(dict(c, model_type=cfg.model_type), i), (i, sparse)
    # MTP tensors (layers >= num_hidden_layers) are exactly the unexpected keys.
    mtp = {k for k in tensors if k.startswith("model.layers.") and int(k.split(".")[2]) >= c["num_hidden_layers"]}
    # (transformers fuses the MTP layer's per-expert tensors before reporting them)
    ne = c.get("num_experts", c.get("n_routed_experts"))
    mtp_fused = set(fuse_experts({k: tensors[k] for k in mtp}, ne))
    assert unexpected == mtp_fused, (sorted(unexpected - mtp_fused), sorted(mtp_fused - unexpected))
    fused = fuse_experts({k: v for k, v in tensors.items() if k not in mtp}, ne)
    sd = dict(model.state_dict())
    if c["tie_word_embeddings"]:
        assert "lm_head.weight" not in fused
        fused["lm_head.weight"] = fused["model.embed_tokens.weight"]
    assert set(sd) == set(fused), sorted(set(sd) ^ set(fused))
    for name, t in fused.items():
        assert sd[name].dtype == torch.float32, (name, sd[name].dtype)
        assert torch.equal(sd[name], t.float()), f"loaded weight {name} differs from checkpoint"


def check_loaded(model: Qwen3ForCausalLM, tensors: dict[str, torch.Tensor], spec: dict) -> None:
    cfg = model.config
    assert cfg.rope_parameters["rope_type"] == "default", cfg.rope_parameters
    assert cfg.rope_parameters["rope_theta"] == float(spec["rope_theta"]), cfg.rope_parameters
    for k, v in spec["config"].items():
        assert getattr(cfg, k) == v, (k, getattr(cfg, k), v)
    windows = layer_windows(json.loads((Path(cfg.name_or_path) / "config.json").read_text()))
    assert cfg.layer_types == ["sliding_attention" if w else "full_attention" for w in windows], cfg.layer_types
    assert cfg.sliding_window == next((w for w in windows if w), None), cfg.sliding_window
    # Rotary inverse frequencies must reflect the on-disk theta.
    hd = spec["config"]["head_dim"]
    expected_inv = 1.0 / (
        float(spec["rope_theta"]) ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd)
    )
    assert torch.allclose(model.model.rotary_emb.inv_freq.float(), expected_inv), "inv_freq mismatch"
    sd = model.state_dict()
    for name, t in tensors.items():
        assert sd[name].dtype == torch.float32, (name, sd[name].dtype)
        assert torch.equal(sd[name], t.float()), f"loaded weight {name} differs from checkpoint"
    if spec["config"]["tie_word_embeddings"]:
        assert torch.equal(sd["lm_head.weight"], tensors["model.embed_tokens.weight"].float())
    else:
        assert torch.equal(sd["lm_head.weight"], tensors["lm_head.weight"].float())


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> float:
    diff = (a - b).abs().max().item()
    if not torch.allclose(a, b, atol=ATOL, rtol=RTOL):
        raise AssertionError(f"{what}: max abs diff {diff}")
    return diff


def top2_margin(logits: torch.Tensor) -> float:
    v = torch.topk(logits, 2).values
    return (v[0] - v[1]).item()


@torch.no_grad()
def compute_reference(model: Qwen3ForCausalLM, prompt: list[int]) -> tuple[dict, dict]:
    """Returns (reference dict or None if greedy would emit an eos id, stats dict).
    Raises AssertionError on sanity failures."""
    from transformers import DynamicCache

    ids = torch.tensor([prompt], dtype=torch.long)
    max_diff = 0.0
    decisions: list[torch.Tensor] = []  # logit vectors on which a greedy choice is made

    # 1. Prefill + cached single-token steps.
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    prefill = out.logits[0].float().clone()  # [T, V]
    cache = out.past_key_values
    steps = []
    next_id = int(prefill[-1].argmax())
    decisions.append(prefill[-1])
    prompt_len = len(prompt)
    for i in range(NUM_STEPS):
        pos = prompt_len + i
        out = model(
            input_ids=torch.tensor([[next_id]]),
            past_key_values=cache,
            position_ids=torch.tensor([[pos]]),
            use_cache=True,
        )
        cache = out.past_key_values
        logits = out.logits[0, -1].float().clone()
        steps.append({"input_id": next_id, "position": pos, "logits": logits})
        decisions.append(logits)
        next_id = int(logits.argmax())

    # 2. Sanity: a single no-cache forward over prompt + step inputs gives the same logits.
    full_ids = torch.tensor([prompt + [s["input_id"] for s in steps]])
    full = model(input_ids=full_ids, use_cache=False).logits[0].float()
    max_diff = max(max_diff, assert_close(full[:prompt_len], prefill, "no-cache vs prefill"))
    for i, s in enumerate(steps):
        max_diff = max(max_diff, assert_close(full[prompt_len + i], s["logits"], f"no-cache vs step {i}"))

    # 3. Token-by-token: prompt fed one token at a time through the cache, then greedy decode.
    cache = DynamicCache(config=model.config)
    logits = None
    for pos, tok in enumerate(prompt):
        out = model(
            input_ids=torch.tensor([[tok]]),
            past_key_values=cache,
            position_ids=torch.tensor([[pos]]),
            use_cache=True,
        )
        cache = out.past_key_values
        logits = out.logits[0, -1].float()
        max_diff = max(max_diff, assert_close(logits, prefill[pos], f"token-by-token prompt pos {pos}"))
    tbt = []
    pos = prompt_len
    for i in range(MAX_NEW_TOKENS):
        if i > 0:
            decisions.append(logits)
        tok = int(logits.argmax())
        tbt.append(tok)
        if i < NUM_STEPS:
            # the first decode steps must agree with the cached steps above
            assert tok == steps[i]["input_id"], (i, tok, steps[i]["input_id"])
            if i > 0:
                max_diff = max(max_diff, assert_close(logits, steps[i - 1]["logits"], f"tbt step {i}"))
        if i == MAX_NEW_TOKENS - 1:
            break
        out = model(
            input_ids=torch.tensor([[tok]]),
            past_key_values=cache,
            position_ids=torch.tensor([[pos]]),
            use_cache=True,
        )
        cache = out.past_key_values
        logits = out.logits[0, -1].float()
        pos += 1

    all_logits = torch.cat([prefill] + [s["logits"][None] for s in steps])
    stats = {
        "max_sanity_diff": max_diff,
        "min_margin": min(top2_margin(d) for d in decisions),
        "min_logit_std": min(all_logits.std(dim=-1).tolist()),
        "max_abs_logit": all_logits.abs().max().item(),
        "eos_chosen": any(int(d.argmax()) in GEN_EOS_IDS for d in decisions),
        "finite": bool(torch.isfinite(all_logits).all()),
    }
    if stats["eos_chosen"]:
        # generate() masks eos while min_new_tokens is not reached, plain argmax does not:
        # the two would legitimately differ, so such a candidate is rejected by the caller.
        return None, stats

    # 4. model.generate greedy.
    gen_cfg = GenerationConfig(
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
        min_new_tokens=MAX_NEW_TOKENS,
        bos_token_id=BOS_ID,
        eos_token_id=GEN_EOS_IDS,
        pad_token_id=PAD_ID,
    )
    gen = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        generation_config=gen_cfg,
    )
    generated = [int(t) for t in gen[0, prompt_len:].tolist()]
    assert len(generated) == MAX_NEW_TOKENS, generated
    assert generated == tbt, f"generate {generated} != token-by-token {tbt}"

    ref = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "dtype": "float32",
        "prompt_ids": list(prompt),
        "prefill_logits": [row for row in prefill],
        "steps": steps,
        "greedy": {
            "prompt_ids": list(prompt),
            "max_new_tokens": MAX_NEW_TOKENS,
            "generated_ids": generated,
        },
        "greedy_token_by_token": tbt,
    }
    stats["distinct_generated"] = len(set(generated))
    return ref, stats


# --------------------------------------------------------------------------------------
# reference.json writer (float32 values written as the shortest repr of the exact double,
# so parsing as f64 then casting, or parsing directly as f32, both give the exact value)
# --------------------------------------------------------------------------------------


def f32_list(t: torch.Tensor) -> str:
    arr = t.detach().cpu().numpy().astype(np.float32)
    parts = []
    for x in arr.tolist():  # python floats holding exact float32 values
        x = float(np.float32(x))
        assert math.isfinite(x)
        assert float(np.float32(float(repr(x)))) == x
        parts.append(repr(x))
    return "[" + ",".join(parts) + "]"


def int_list(xs) -> str:
    return "[" + ", ".join(str(int(x)) for x in xs) + "]"


def reference_json_text(ref: dict) -> str:
    lines = ["{"]
    lines.append(f'  "transformers_version": {json.dumps(ref["transformers_version"])},')
    lines.append(f'  "torch_version": {json.dumps(ref["torch_version"])},')
    lines.append(f'  "dtype": {json.dumps(ref["dtype"])},')
    lines.append(f'  "prompt_ids": {int_list(ref["prompt_ids"])},')
    lines.append('  "prefill_logits": [')
    rows = [f"    {f32_list(r)}" for r in ref["prefill_logits"]]
    lines.append(",\n".join(rows))
    lines.append("  ],")
    lines.append('  "steps": [')
    rows = [
        f'    {{"input_id": {s["input_id"]}, "position": {s["position"]}, "logits": {f32_list(s["logits"])}}}'
        for s in ref["steps"]
    ]
    lines.append(",\n".join(rows))
    lines.append("  ],")
    g = ref["greedy"]
    lines.append(
        f'  "greedy": {{"prompt_ids": {int_list(g["prompt_ids"])}, "max_new_tokens": {g["max_new_tokens"]}, '
        f'"generated_ids": {int_list(g["generated_ids"])}}},'
    )
    lines.append(f'  "greedy_token_by_token": {int_list(ref["greedy_token_by_token"])}')
    lines.append("}")
    text = "\n".join(lines) + "\n"
    # Validate: parses, has exactly the expected keys, and floats round-trip to float32.
    parsed = json.loads(text)
    assert list(parsed) == list(ref), list(parsed)
    np.testing.assert_array_equal(
        np.asarray(parsed["prefill_logits"], dtype=np.float32),
        torch.stack(ref["prefill_logits"]).numpy().astype(np.float32),
    )
    for ps, s in zip(parsed["steps"], ref["steps"]):
        np.testing.assert_array_equal(np.asarray(ps["logits"], dtype=np.float32), s["logits"].numpy())
    return text


# --------------------------------------------------------------------------------------
# Independent NumPy (float64) re-implementation, reading config.json and the safetensors
# files directly -- i.e. the way the Rust side has to. Cross-checks the committed folder.
# --------------------------------------------------------------------------------------


def read_rope_theta(cfg: dict) -> float:
    """Mirror of transformers 5's precedence: rope_parameters.rope_theta, then top-level
    rope_theta, then (legacy) rope_scaling.rope_theta, then the 10000 default."""
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    assert rp.get("rope_type", rp.get("type", "default")) == "default", rp
    if "rope_theta" in rp:
        return float(rp["rope_theta"])
    return float(cfg.get("rope_theta", 10000.0))


def load_numpy_weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    w = {}
    for f in files:
        for k, v in load_file(str(folder / f)).items():
            w[k] = v.to(torch.float64).numpy()
    return w


def layer_windows(cfg: dict) -> list[int | None]:
    """Each Qwen3 layer's attention window from config.json (None: full attention), as
    Qwen3Config resolves it: only with use_sliding_window; an explicit layer_types list, else
    the layers from max_window_layers (default 28) on."""
    n = cfg["num_hidden_layers"]
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    types = cfg.get("layer_types") or [
        "sliding_attention" if window is not None and i >= cfg.get("max_window_layers", 28) else "full_attention"
        for i in range(n)
    ]
    return [window if t == "sliding_attention" else None for t in types]


def causal_mask(T: int, window: int | None) -> np.ndarray:
    """Additive (T, T) mask: query i sees keys j <= i, and with a window W only j > i - W
    (the last W positions, its own included)."""
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    seen = (j <= i) & ((j > i - window) if window else True)
    return np.where(seen, 0.0, -np.inf)


def numpy_forward(folder: Path, ids: list[int]) -> np.ndarray:
    cfg = json.loads((folder / "config.json").read_text())
    if cfg["model_type"] != "qwen3":
        return numpy_forward_moe(folder, ids)
    w = load_numpy_weights(folder)
    H, KV, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    theta = read_rope_theta(cfg)
    T = len(ids)

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    inv = 1.0 / theta ** (np.arange(0, D, 2) / D)
    ang = np.arange(T)[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]

    def rope(x):  # [T, h, D]
        rot = np.concatenate([-x[..., D // 2 :], x[..., : D // 2]], -1)
        return x * cos + rot * sin

    x = w["model.embed_tokens.weight"][ids]
    for i, window in enumerate(layer_windows(cfg)):
        mask = causal_mask(T, window)
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = rms((h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, H, D), w[p + "self_attn.q_norm.weight"])
        k = rms((h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, KV, D), w[p + "self_attn.k_norm.weight"])
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, KV, D)
        q, k = rope(q), rope(k)
        k = np.repeat(k, H // KV, axis=1)
        v = np.repeat(v, H // KV, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(D) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", s, v).reshape(T, H * D)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        g = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    x = rms(x, w["model.norm.weight"])
    lm_head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    return x @ lm_head.T


# ---- MoE (qwen3_moe, glm4_moe) ---------------------------------------------------------


def read_partial_rotary_factor(cfg: dict) -> float:
    """transformers-5 precedence: rope_parameters (or legacy rope_scaling) .partial_rotary_factor,
    then the top-level partial_rotary_factor, then the model default: 0.5 for glm4_moe
    (Glm4MoeConfig.__post_init__ sets it), 1.0 otherwise."""
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if "partial_rotary_factor" in rp:
        return float(rp["partial_rotary_factor"])
    if cfg.get("partial_rotary_factor") is not None:
        return float(cfg["partial_rotary_factor"])
    return 0.5 if cfg["model_type"] == "glm4_moe" else 1.0


def num_experts(cfg: dict) -> int:
    """Hub Qwen3-MoE files say num_experts; transformers 5 writes num_local_experts (its
    attribute_map alias) instead; GLM says n_routed_experts."""
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if key in cfg:
            return cfg[key]
    raise KeyError("num_experts")


def layer_is_sparse(cfg: dict, i: int) -> bool:
    if cfg["model_type"] == "qwen3_moe":
        return (
            i not in (cfg.get("mlp_only_layers") or [])
            and num_experts(cfg) > 0
            and (i + 1) % cfg["decoder_sparse_step"] == 0
        )
    if cfg["model_type"] == "glm4_moe":
        return i >= cfg["first_k_dense_replace"]
    raise ValueError(cfg["model_type"])


def np_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, largest first; exact ties -> lower expert index first."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def np_route(cfg: dict, h: np.ndarray, w: dict, p: str) -> dict:
    """Router of one MoE layer. h: [T, hidden] float64 (post_attention_layernorm output).
    Returns chosen expert ids [T, k] (best first), their weights [T, k], and diagnostics."""
    k = cfg["num_experts_per_tok"]
    logits = h @ w[p + "mlp.gate.weight"].T  # [T, E]
    T, E = logits.shape
    r = {}
    if cfg["model_type"] == "qwen3_moe":
        z = np.exp(logits - logits.max(-1, keepdims=True))
        probs = z / z.sum(-1, keepdims=True)  # softmax over ALL experts
        idx = np_topk(probs, k)
        wts = np.take_along_axis(probs, idx, -1)
        if cfg["norm_topk_prob"]:
            wts = wts / wts.sum(-1, keepdims=True)
        srt = -np.sort(-probs, -1)
        r["margin"] = (srt[:, k - 1] - srt[:, k]).min() if k < E else np.inf
    else:
        s = 1.0 / (1.0 + np.exp(-logits))  # sigmoid
        sc = s + w[p + "mlp.gate.e_score_correction_bias"][None, :]  # selection scores
        G, TG = cfg["n_group"], cfg["topk_group"]
        per = E // G
        gs = -np.sort(-sc.reshape(T, G, per), -1)[:, :, :2].sum(-1)  # [T, G] sum of top-2
        gsel = np_topk(gs, TG)
        gmask = np.zeros((T, G), dtype=bool)
        np.put_along_axis(gmask, gsel, True, -1)
        emask = np.repeat(gmask, per, axis=-1)  # group g = experts [g*per, (g+1)*per)
        scm = np.where(emask, sc, -np.inf)
        idx = np_topk(scm, k)
        wts = np.take_along_axis(s, idx, -1)  # weights from the UNBIASED sigmoid
        if cfg["norm_topk_prob"]:
            wts = wts / (wts.sum(-1, keepdims=True) + 1e-20)
        wts = wts * cfg["routed_scaling_factor"]
        srt = -np.sort(-scm, -1)
        r["margin"] = np.nan_to_num(srt[:, k - 1] - srt[:, k], posinf=np.inf).min() if k < E else np.inf
        if G > TG:
            gsrt = -np.sort(-gs, -1)
            r["margin"] = min(r["margin"], (gsrt[:, TG - 1] - gsrt[:, TG]).min())
        r["groups"] = gsel
        # Diagnostics: would the choice differ without the bias / without group limiting?
        r["bias_changes_choice"] = bool(
            (np.sort(np_topk(np.where(emask, s, -np.inf), k), -1) != np.sort(idx, -1)).any()
        )
        r["groups_change_choice"] = bool((np.sort(np_topk(sc, k), -1) != np.sort(idx, -1)).any())
    r["idx"], r["weights"] = idx, wts
    return r


def numpy_forward_moe(folder: Path, ids: list[int], trace: list | None = None) -> np.ndarray:
    """float64 forward of Qwen3-MoE / GLM-4-MoE from config.json + safetensors. If `trace` is a
    list, the routing result (np_route dict + layer index) of every MoE layer is appended."""
    cfg = json.loads((folder / "config.json").read_text())
    mt = cfg["model_type"]
    w = load_numpy_weights(folder)
    H, KV, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    theta = read_rope_theta(cfg)
    rd = int(D * read_partial_rotary_factor(cfg))  # rotary dims: the FIRST rd of each head
    qk_norm = mt == "qwen3_moe" or cfg.get("use_qk_norm", False)
    T = len(ids)

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    inv = 1.0 / theta ** (np.arange(0, rd, 2) / rd)
    ang = np.arange(T)[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]  # [T, 1, rd]  (cat, not interleave)
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]

    def rope(x):  # [T, h, D]; half-split rotate_half within the first rd dims
        xr, xp = x[..., :rd], x[..., rd:]
        rot = np.concatenate([-xr[..., rd // 2 :], xr[..., : rd // 2]], -1)
        return np.concatenate([xr * cos + rot * sin, xp], -1)

    def lin(x, name):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    def mlp(x, pre):
        g = x @ w[pre + "gate_proj.weight"].T
        return ((g / (1 + np.exp(-g))) * (x @ w[pre + "up_proj.weight"].T)) @ w[pre + "down_proj.weight"].T

    x = w["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):  # layers >= num_hidden_layers (MTP) are ignored
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = lin(h, p + "self_attn.q_proj").reshape(T, H, D)
        k = lin(h, p + "self_attn.k_proj").reshape(T, KV, D)
        v = lin(h, p + "self_attn.v_proj").reshape(T, KV, D)
        if qk_norm:
            q = rms(q, w[p + "self_attn.q_norm.weight"])
            k = rms(k, w[p + "self_attn.k_norm.weight"])
        q, k = rope(q), rope(k)
        k = np.repeat(k, H // KV, axis=1)
        v = np.repeat(v, H // KV, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(D) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", s, v).reshape(T, H * D)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        if not layer_is_sparse(cfg, i):
            x = x + mlp(h, p + "mlp.")
            continue
        r = np_route(cfg, h, w, p)
        if trace is not None:
            trace.append(dict(r, layer=i))
        y = np.zeros_like(h)
        for j in range(r["idx"].shape[1]):
            for t in range(T):
                e = r["idx"][t, j]
                y[t] += r["weights"][t, j] * mlp(h[t : t + 1], f"{p}mlp.experts.{e}.")[0]
        if mt == "glm4_moe":
            y = y + mlp(h, p + "mlp.shared_experts.")
        x = x + y
    x = rms(x, w["model.norm.weight"])
    lm_head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    return x @ lm_head.T


@torch.no_grad()
def window_effect(folder: Path) -> float:
    """For a fixture with sliding layers: max |logit diff| between the reference and the same
    weights with full attention, over the positions past the window (asserting the positions
    inside it agree), so a graph that ignores the window cannot pass the parity test."""
    ref = json.loads((folder / "reference.json").read_text())
    window = min(w for w in layer_windows(json.loads((folder / "config.json").read_text())) if w)
    ids = ref["prompt_ids"] + [s["input_id"] for s in ref["steps"]]
    expected = torch.tensor(ref["prefill_logits"] + [s["logits"] for s in ref["steps"]])
    with tempfile.TemporaryDirectory(prefix="fixture-full-attention-") as tmp:
        for f in folder.iterdir():
            shutil.copyfile(f, Path(tmp) / f.name)
        cfg = json.loads((folder / "config.json").read_text())
        cfg["use_sliding_window"] = False
        write_json_pretty(cfg, Path(tmp) / "config.json")
        full = load_from_folder(Path(tmp))
    assert full.config.sliding_window is None
    logits = full(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    assert_close(logits[:window], expected[:window], "full attention within the window")
    return (logits[window:] - expected[window:]).abs().max().item()


def numpy_cross_check(folder: Path) -> float:
    ref = json.loads((folder / "reference.json").read_text())
    prompt = ref["prompt_ids"]
    steps = ref["steps"]
    ids = prompt + [s["input_id"] for s in steps]
    logits = numpy_forward(folder, ids)
    expected = np.asarray(ref["prefill_logits"] + [s["logits"] for s in steps], dtype=np.float64)
    diff = float(np.abs(logits - expected).max())
    assert diff < 1e-4, f"numpy vs reference logits: max abs diff {diff}"
    # Greedy ids: full recompute over prompt + generated tokens.
    gen = ref["greedy"]["generated_ids"]
    full = numpy_forward(folder, prompt + gen[:-1])
    assert [int(t) for t in full[len(prompt) - 1 :].argmax(-1)] == gen, "numpy greedy mismatch"
    return diff


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def make_prompt(seed: int, spec: dict) -> list[int]:
    g = torch.Generator().manual_seed(seed + 7)
    # avoid the special ids 0..2
    length = spec.get("prompt_len", PROMPT_LEN)
    return [int(x) for x in torch.randint(3, spec["config"]["vocab_size"], (length,), generator=g).tolist()]


def candidate_ok(stats: dict) -> tuple[bool, str]:
    if not stats["finite"]:
        return False, "non-finite logits"
    if stats["eos_chosen"]:
        return False, "greedy picks an eos id"
    if stats["min_margin"] < MIN_MARGIN:
        return False, f"min top-2 margin {stats['min_margin']:.4g} < {MIN_MARGIN}"
    if stats["min_logit_std"] < MIN_LOGIT_STD:
        return False, f"logit std {stats['min_logit_std']:.3g} < {MIN_LOGIT_STD}"
    if stats["distinct_generated"] < MIN_DISTINCT_GENERATED:
        return False, f"only {stats['distinct_generated']} distinct generated tokens"
    return True, "ok"


def write_checkpoint(spec: dict, seed: int, out: Path) -> dict[str, torch.Tensor]:
    model = build_random_model(spec, seed)
    tensors = checkpoint_tensors(model, spec)
    write_config(spec, model.config, out)
    write_generation_config(spec, out)
    write_weights(tensors, spec, out)
    return tensors


def make_fixture(name: str, spec: dict) -> None:
    vocab = spec["config"]["vocab_size"]
    for attempt in range(MAX_SEED_TRIES):
        seed = spec["seed"] + attempt
        with tempfile.TemporaryDirectory(prefix=f"fixture-{name}-") as tmp:
            tmp = Path(tmp)
            tensors = write_checkpoint(spec, seed, tmp)
            model = load_from_folder(tmp)
            check_loaded(model, tensors, spec)
            prompt = make_prompt(seed, spec)
            ref, stats = compute_reference(model, prompt)
            ok, why = candidate_ok(stats)
            if not ok:
                print(f"  [{name}] seed {seed} rejected: {why}")
                continue
            (tmp / "reference.json").write_text(reference_json_text(ref))
            final = FIXTURES_DIR / name
            if final.exists():
                shutil.rmtree(final)
            final.mkdir(parents=True)
            for f in sorted(tmp.iterdir()):
                shutil.copyfile(f, final / f.name)
        # Final check on the committed folder itself.
        model = load_from_folder(final)
        check_loaded(model, tensors, spec)
        ref2, _ = compute_reference(model, prompt)
        assert reference_json_text(ref2) == (final / "reference.json").read_text(), "non-deterministic"
        np_diff = numpy_cross_check(final)
        window_note = ""
        if spec["config"].get("use_sliding_window"):
            effect = window_effect(final)
            assert effect > MIN_WINDOW_EFFECT, f"the window changes the logits by only {effect}"
            window_note = f"full attention past the window differs by {effect:.2f}, "
        total = sum(f.stat().st_size for f in final.iterdir())
        print(
            f"  [{name}] seed {seed}: prompt {prompt}\n"
            f"      generated {ref['greedy']['generated_ids']}\n"
            f"      min margin {stats['min_margin']:.4f}, min logit std {stats['min_logit_std']:.3f}, "
            f"max |logit| {stats['max_abs_logit']:.2f}, sanity max diff {stats['max_sanity_diff']:.2e}, "
            f"numpy-f64 max diff {np_diff:.2e}, {window_note}"
            f"{total / 1024:.0f} KiB"
        )
        assert total < 1_500_000, f"{name} is too large: {total} bytes"
        return
    raise SystemExit(f"{name}: no acceptable seed in {MAX_SEED_TRIES} tries")


@torch.no_grad()
def hf_routing(model, ids: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(expert ids [T, k], weights [T, k]) of every MoE layer of the transformers model in one
    no-cache forward, captured from the router modules (mlp.gate) outputs."""
    got = []
    hooks = [
        layer.mlp.gate.register_forward_hook(
            lambda mod, inp, out: got.append((out[2].numpy().copy(), out[1].double().numpy().copy()))
        )
        for layer in model.model.layers
        if hasattr(layer.mlp, "experts")
    ]
    try:
        model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return got


def moe_routing_checks(folder: Path, ref: dict, spec: dict) -> tuple[bool, str, dict]:
    """Acceptance criteria on the float64 NumPy routing (see MIN_ROUTE_MARGIN etc.)."""
    c = spec["config"]
    E = c.get("num_experts", c.get("n_routed_experts"))
    prompt = ref["prompt_ids"]
    seq = prompt + ref["greedy"]["generated_ids"][:-1]
    trace: list = []
    numpy_forward_moe(folder, seq, trace)
    st = {"route_margin": min(float(r["margin"]) for r in trace)}
    cover = [len(set(r["idx"][: len(prompt)].ravel().tolist())) for r in trace]
    st["coverage"] = cover
    if st["route_margin"] < MIN_ROUTE_MARGIN:
        return False, f"routing margin {st['route_margin']:.3g} < {MIN_ROUTE_MARGIN}", st
    if min(cover) < MIN_EXPERT_COVERAGE * E:
        return False, f"prompt expert coverage {cover} < {MIN_EXPERT_COVERAGE} * {E}", st
    if family_of(spec) == "glm4_moe":
        if not any(r["bias_changes_choice"] for r in trace):
            return False, "e_score_correction_bias never changes the choice", st
        if c["n_group"] > c["topk_group"]:
            groups = [len(set(r["groups"][: len(prompt)].ravel().tolist())) for r in trace]
            st["groups"] = groups
            if min(groups) < c["n_group"]:
                return False, f"not every expert group chosen in the prompt: {groups}", st
            if not any(r["groups_change_choice"] for r in trace):
                return False, "group limiting never changes the choice", st
    return True, "ok", st


def check_save_pretrained_layout(model, tensors: dict[str, torch.Tensor], spec: dict) -> None:
    """The hand-written Hub layout equals what transformers 5 save_pretrained writes (names,
    shapes, values), apart from the MTP tensors, which transformers does not save."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="fixture-save-") as d:
        model.save_pretrained(d)
        saved = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            saved.update(load_file(str(f)))
    n = spec["config"]["num_hidden_layers"]
    mine = {k: v for k, v in tensors.items() if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= n)}
    assert set(saved) == set(mine), sorted(set(saved) ^ set(mine))
    for k, v in mine.items():
        assert torch.equal(saved[k].float().to(v.dtype), v), k


def make_moe_fixture(name: str, spec: dict) -> None:
    vocab = spec["config"]["vocab_size"]
    for attempt in range(MAX_SEED_TRIES):
        seed = spec["seed"] + attempt
        with tempfile.TemporaryDirectory(prefix=f"fixture-{name}-") as tmp:
            tmp = Path(tmp)
            model0 = build_random_model(spec, seed)
            tensors = checkpoint_tensors_moe(model0, spec, seed)
            check_save_pretrained_layout(model0, tensors, spec)
            write_config(spec, model0.config, tmp)
            write_generation_config(spec, tmp)
            write_weights(tensors, spec, tmp)
            model, unexpected = load_moe_from_folder(tmp, spec)
            check_loaded_moe(model, unexpected, tensors, spec)
            prompt = make_prompt(seed, spec)
            ref, stats = compute_reference(model, prompt)
            ok, why = candidate_ok(stats)
            if ok:
                ok, why, rstats = moe_routing_checks(tmp, ref, spec)
            if not ok:
                print(f"  [{name}] seed {seed} rejected: {why}")
                continue
            (tmp / "reference.json").write_text(reference_json_text(ref))
            final = FIXTURES_DIR / name
            if final.exists():
                shutil.rmtree(final)
            final.mkdir(parents=True)
            for f in sorted(tmp.iterdir()):
                shutil.copyfile(f, final / f.name)
        # Final checks on the committed folder itself.
        model, unexpected = load_moe_from_folder(final, spec)
        check_loaded_moe(model, unexpected, tensors, spec)
        ref2, _ = compute_reference(model, prompt)
        assert reference_json_text(ref2) == (final / "reference.json").read_text(), "non-deterministic"
        np_diff = numpy_cross_check(final)
        # Routing of transformers == routing of the NumPy re-implementation (ids as sets, weights).
        seq = prompt + ref["greedy"]["generated_ids"][:-1]
        trace: list = []
        numpy_forward_moe(final, seq, trace)
        hf = hf_routing(model, seq)
        assert len(hf) == len(trace)
        w_diff = 0.0
        for (hidx, hw), r in zip(hf, trace):
            ho, no = np.argsort(hidx, -1), np.argsort(r["idx"], -1)
            assert (np.take_along_axis(hidx, ho, -1) == np.take_along_axis(r["idx"], no, -1)).all(), "routing ids"
            d = np.abs(np.take_along_axis(hw, ho, -1) - np.take_along_axis(r["weights"], no, -1)).max()
            w_diff = max(w_diff, float(d))
        assert w_diff < 1e-5, f"routing weights differ by {w_diff}"
        # transformers' default experts kernel (grouped_mm) agrees with the eager loop.
        model_gm, _ = load_moe_from_folder(final, spec, experts_implementation="grouped_mm")
        with torch.no_grad():
            a = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0]
            b = model_gm(input_ids=torch.tensor([seq]), use_cache=False).logits[0]
        gm_diff = assert_close(a, b, "grouped_mm vs eager experts")
        total = sum(f.stat().st_size for f in final.iterdir())
        print(
            f"  [{name}] seed {seed}: prompt {prompt}\n"
            f"      generated {ref['greedy']['generated_ids']}\n"
            f"      min margin {stats['min_margin']:.4f}, min logit std {stats['min_logit_std']:.3f}, "
            f"max |logit| {stats['max_abs_logit']:.2f}, sanity max diff {stats['max_sanity_diff']:.2e}, "
            f"numpy-f64 max diff {np_diff:.2e}\n"
            f"      routing: min margin {rstats['route_margin']:.4f}, prompt coverage per MoE layer "
            f"{rstats['coverage']}{', groups ' + str(rstats['groups']) if 'groups' in rstats else ''}, "
            f"hf-vs-numpy weight diff {w_diff:.1e}, grouped_mm diff {gm_diff:.1e}, {total / 1024:.0f} KiB"
        )
        assert total < 1_500_000, f"{name} is too large: {total} bytes"
        return
    raise SystemExit(f"{name}: no acceptable seed in {MAX_SEED_TRIES} tries")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=sorted(FIXTURES), help="fixture name (repeatable)")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    names = args.only or list(FIXTURES)
    for name in names:
        print(f"fixture {name}")
        if family_of(FIXTURES[name]) == "qwen3":
            make_fixture(name, FIXTURES[name])
        else:
            make_moe_fixture(name, FIXTURES[name])


if __name__ == "__main__":
    main()
