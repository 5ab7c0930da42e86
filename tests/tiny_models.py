"""Tiny random MoE checkpoints written by stock transformers, one per family: the tests' family table.

`make_tiny_checkpoint(model_type, path)` builds a 3–4 layer model with `AutoConfig.for_model` and the class
LLaMA-Factory loads it with (`kt_sft.models.derive.model_class`), re-initialises every tensor from a seeded
generator so that logits are far from uniform and the routed experts matter, and saves it with
`save_pretrained(max_shard_size=...)`, i.e. with the on-disk keys transformers 5.6 writes: per-expert
(`...mlp.experts.0.gate_proj.weight`; mixtral / minimax / phimoe `...block_sparse_moe.experts.0.w1.weight`; lfm2_moe
and jamba `...feed_forward.experts.0.w1.weight` / `gate_proj`) where transformers' conversion mapping splits the
fused experts, else the fused tensors themselves (mistral4, qwen3_5_moe_text), spread over several shard files.
Tests get them from the session fixtures of conftest.py (`family`, `tiny_checkpoint`), written once per session.

Two tables, and the families of the installed transformers beyond them (`new_families()`, on `generic_kwargs`):
  FAMILIES       the 7 families of the full parity suite (test_offload_parity.py, test_expert_lora_peft.py,
                 test_generate_parity.py, ...): hidden 64, 8 routed experts of width 16, top-2, vocab 128
  ALL_FAMILIES   every transformers 5.6 family whose fused experts the engine computes (silu, gpt-oss swiglu with
                 biases, GELU-tanh, ungated relu^2), each checked by
                 test_families.py (logits, LoRA steps with expert LoRA, greedy generation against stock); the
                 families beyond FAMILIES use quirky sizes: hidden 48, head_dim 12, 6 routed experts of width 20,
                 top-3 (top-2 where the router needs groups), vocab 128, a dense first layer where the family has one

Per family of FAMILIES (transformers 5.6 names):
  dense first layer:  qwen2_moe mlp_only_layers=[0]; qwen3_moe decoder_sparse_step=2 (MoE at layers 1, 3);
                      deepseek_v2/v3, glm4_moe first_k_dense_replace=1; lfm2_moe num_dense_layers=1; mixtral has
                      none (every layer MoE)
  shared experts:     qwen2_moe shared_expert (+ sigmoid shared_expert_gate); deepseek/glm n_shared_experts=1
  experts module:     model.layers.{i}.mlp.experts, lfm2_moe: model.layers.{i}.feed_forward.experts (the derived
                      family's experts_module; `experts_path`)
  lfm2_moe:           short-convolution and attention layers mixed, sigmoid router with an expert bias, and a config
                      without hidden_act (the model code fixes SiLU; the math probe finds it)
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoConfig

from kt_sft.models import catalog
from kt_sft.models.derive import build_meta, derive_family, model_class

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # example rule files, one per family of FAMILIES
FAMILIES = ("qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "mixtral", "glm4_moe", "lfm2_moe")

HIDDEN, EXPERTS, MOE_INTER, TOP_K, VOCAB = 64, 8, 16, 2, 128

_COMMON = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    num_experts_per_tok=TOP_K, hidden_act="silu", max_position_embeddings=64, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
# The quirky sizes of the families beyond FAMILIES (see the module doc).
_QUIRKY = dict(_COMMON, hidden_size=48, head_dim=12, intermediate_size=40, moe_intermediate_size=20,
               num_experts_per_tok=3)
Q_EXPERTS = 6
# deepseek MLA, kept tiny: q (rank q_lora_rank or plain q_proj) -> heads x (nope 8 + rope 8); kv rank 16.
_MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=4)
_QUIRKY_MLA = dict(_MLA, head_dim=8)  # these configs take head_dim as the rotary part (qk_rope_head_dim)
_DENSE_FIRST = ["dense", "sparse", "sparse"]

FAMILY_KWARGS = {
    "qwen2_moe": dict(num_experts=EXPERTS, moe_intermediate_size=MOE_INTER, intermediate_size=48,
                      shared_expert_intermediate_size=32, mlp_only_layers=[0], norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=EXPERTS, moe_intermediate_size=MOE_INTER, intermediate_size=48,
                      num_hidden_layers=4, decoder_sparse_step=2, norm_topk_prob=True, head_dim=16),
    # v2 (Lite-style): plain q_proj, softmax greedy top-k, no top-k renormalisation, scaled weights
    "deepseek_v2": dict(_MLA, n_routed_experts=EXPERTS, moe_intermediate_size=MOE_INTER, intermediate_size=48,
                        n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None, topk_method="greedy",
                        routed_scaling_factor=1.5),
    # v3: low-rank q, sigmoid scores + e_score_correction_bias, group-limited (4 groups of 2, best 2 groups)
    "deepseek_v3": dict(_MLA, n_routed_experts=EXPERTS, moe_intermediate_size=MOE_INTER, intermediate_size=48,
                        n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=24, n_group=4, topk_group=2,
                        norm_topk_prob=True, routed_scaling_factor=2.5),
    # mixtral: the experts' width is `intermediate_size`; no dense layer, no shared expert
    "mixtral": dict(num_local_experts=EXPERTS, intermediate_size=MOE_INTER, head_dim=16),
    # glm4_moe: like v3 routing with a single group; partial rotary, attention biases (GLM-4.5 has them)
    "glm4_moe": dict(n_routed_experts=EXPERTS, moe_intermediate_size=MOE_INTER, intermediate_size=48,
                     n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True,
                     routed_scaling_factor=1.5, attention_bias=True, head_dim=16),
    # lfm2_moe: dense conv layer, MoE attention layer, MoE conv layer
    "lfm2_moe": dict(num_experts=EXPERTS, moe_intermediate_size=MOE_INTER, intermediate_size=48, num_dense_layers=1,
                     layer_types=["conv", "full_attention", "conv"]),
}
# The families beyond FAMILIES, on _QUIRKY sizes: what each config needs besides them.
QUIRKY_KWARGS = {
    # sliding + full attention, 1 dense layer, a shared expert, mup scaling off
    "afmoe": dict(num_experts=Q_EXPERTS, num_shared_experts=1, num_dense_layers=1, global_attn_every_n_layers=2,
                  sliding_window=8),
    "dots1": dict(n_routed_experts=Q_EXPERTS, n_shared_experts=1, first_k_dense_replace=1),
    # moe layers 1..2, two shared experts
    "ernie4_5_moe": dict(moe_num_experts=Q_EXPERTS, moe_k=3, moe_num_shared_experts=2, moe_layer_start_index=1,
                         moe_layer_end_index=2),
    "exaone_moe": dict(num_experts=Q_EXPERTS, num_shared_experts=1, first_k_dense_replace=1,
                       mlp_layer_types=_DENSE_FIRST, sliding_window=8, sliding_window_pattern=2),
    # the experts' width is `intermediate_size`; every layer MoE
    "flex_olmo": dict(num_experts=Q_EXPERTS, intermediate_size=20),
    "glm4_moe_lite": dict(_QUIRKY_MLA, n_routed_experts=Q_EXPERTS, n_shared_experts=1, q_lora_rank=24, n_group=2,
                          topk_group=1, num_experts_per_tok=2, mlp_layer_types=_DENSE_FIRST),
    "glm_moe_dsa": dict(_QUIRKY_MLA, n_routed_experts=Q_EXPERTS, n_shared_experts=1, q_lora_rank=24,
                        mlp_layer_types=_DENSE_FIRST, index_topk=4, index_head_dim=8, index_n_heads=2),
    "hunyuan_v1_moe": dict(num_experts=Q_EXPERTS, moe_topk=3),
    "hy_v3": dict(num_experts=Q_EXPERTS, num_shared_experts=1, mlp_layer_types=_DENSE_FIRST),
    # mamba + attention layers, experts every other layer from layer 1; the torch (no-kernel) mamba path
    "jamba": dict(num_experts=Q_EXPERTS, intermediate_size=20, expert_layer_period=2, expert_layer_offset=1,
                  attn_layer_period=2, attn_layer_offset=0, use_mamba_kernels=False, mamba_d_state=4,
                  num_hidden_layers=4),
    # lightning (linear) attention and full attention layers
    "minimax": dict(num_local_experts=Q_EXPERTS, intermediate_size=20, block_size=4,
                    layer_types=["linear_attention", "full_attention", "linear_attention"]),
    "minimax_m2": dict(num_local_experts=Q_EXPERTS, intermediate_size=20),
    "mistral4": dict(_MLA, head_dim=16, n_routed_experts=Q_EXPERTS, n_shared_experts=1, q_lora_rank=24, first_k_dense_replace=1),
    "olmoe": dict(num_experts=Q_EXPERTS, intermediate_size=20),
    "phimoe": dict(num_local_experts=Q_EXPERTS, intermediate_size=20, num_experts_per_tok=2),
    "qwen3_5_moe_text": dict(num_experts=Q_EXPERTS, shared_expert_intermediate_size=24, linear_key_head_dim=8,
                             linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                             layer_types=["linear_attention", "full_attention", "linear_attention"]),
    "qwen3_next": dict(num_experts=Q_EXPERTS, shared_expert_intermediate_size=24, linear_key_head_dim=8,
                       linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, mlp_only_layers=[0],
                       layer_types=["linear_attention", "full_attention", "linear_attention"]),
    "solar_open": dict(n_routed_experts=Q_EXPERTS, n_shared_experts=1),
    # gpt-oss: transposed [E, H, 2I] experts with interleaved gate / up, biases, clamped swiglu (limit 7: the
    # routed pre-activations reach it with _reinit's scales only sometimes, so the experts' weights are scaled up,
    # EXPERT_SCALE); sliding + full attention with sinks
    "gpt_oss": dict(num_local_experts=Q_EXPERTS, intermediate_size=20, layer_types=["sliding_attention",
                    "full_attention", "sliding_attention"], sliding_window=8),
    # gemma4 text: GELU-tanh experts beside a dense MLP in every layer, per-expert output scale in the router
    "gemma4_text": dict(enable_moe_block=True, num_experts=Q_EXPERTS, top_k_experts=3, moe_intermediate_size=20,
                        intermediate_size=40, global_head_dim=12, hidden_size_per_layer_input=8,
                        vocab_size_per_layer_input=VOCAB, layer_types=["sliding_attention", "sliding_attention",
                        "full_attention"], sliding_window=8, hidden_activation="gelu_pytorch_tanh"),
    # nemotron_h: mamba, moe (ungated relu^2 experts + a shared expert) and attention layers
    "nemotron_h": dict(layers_block_type=["mamba", "moe", "attention", "moe"], n_routed_experts=Q_EXPERTS,
                       moe_intermediate_size=20, moe_shared_expert_intermediate_size=20, intermediate_size=40,
                       mamba_num_heads=4, mamba_head_dim=12, n_groups=1, ssm_state_size=8, num_hidden_layers=4,
                       use_mamba_kernels=False),
}
# Families whose experts' weights _reinit scales up, so their pre-activations reach the clamp limit of their math.
EXPERT_SCALE = {"gpt_oss": 4.0}
ALL_FAMILIES = tuple(sorted((*FAMILIES, *QUIRKY_KWARGS)))

# Vision-language MoE families (AutoModelForImageTextToText): the _QUIRKY language model (its routed experts on the
# engine) behind a 2-block vision tower of 8x8 patches merged 2x2, so a 32x32 image (grid 1 x 4 x 4 patches) is
# IMAGE_TOKENS tokens; token ids of the image markers inside the tiny vocabulary (VL_TOKENS).
VL_TOKENS = dict(image=120, video=121, start=122, end=123)
IMAGE_GRID, IMAGE_TOKENS, PATCH = (1, 4, 4), 4, 8
_VL_TEXT = {k: v for k, v in _QUIRKY.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")}
_VISION = dict(depth=2, hidden_size=32, intermediate_size=40, num_heads=2, patch_size=PATCH, spatial_merge_size=2,
               temporal_patch_size=2, out_hidden_size=_QUIRKY["hidden_size"])
_QWEN_VL_IDS = dict(image_token_id=VL_TOKENS["image"], video_token_id=VL_TOKENS["video"],
                    vision_start_token_id=VL_TOKENS["start"], vision_end_token_id=VL_TOKENS["end"])
VL_KWARGS = {
    # experts fused on disk, stored transposed by the Hub checkpoints (tests write them so); a dense first layer
    "qwen3_vl_moe": dict(_QWEN_VL_IDS, text_config=dict(_VL_TEXT, num_experts=Q_EXPERTS, mlp_only_layers=[0]),
                         vision_config=dict(_VISION, deepstack_visual_indexes=[0], num_position_embeddings=16)),
    # linear + full attention, a shared expert; experts fused on disk
    "qwen3_5_moe": dict(_QWEN_VL_IDS, vision_config=dict(_VISION, num_position_embeddings=16), text_config=dict(
        _VL_TEXT, num_experts=Q_EXPERTS, shared_expert_intermediate_size=24, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        layer_types=["linear_attention", "full_attention", "linear_attention"])),
    # per-expert keys on disk, a dense first layer and a shared expert; partial M-RoPE over 3 frequencies
    "glm4v_moe": dict(image_token_id=VL_TOKENS["image"], video_token_id=VL_TOKENS["video"],
                      image_start_token_id=VL_TOKENS["start"], image_end_token_id=VL_TOKENS["end"],
                      video_start_token_id=124, video_end_token_id=125, vision_config=dict(_VISION, image_size=32),
                      text_config=dict(_VL_TEXT, n_routed_experts=Q_EXPERTS, n_shared_experts=1,
                                       first_k_dense_replace=1, rope_parameters=dict(
                                           rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 1],
                                           partial_rotary_factor=0.5))),
    # two experts modules per MoE layer: text experts and vision experts of another width, the vision ones taking
    # the image tokens and their markers (moe_mm_token_type_ids); per-expert keys on disk in one list (text 0..5,
    # vision 6..11), routers stored transposed, both routers' score biases in one tensor; a dense first layer, a
    # shared expert, M-RoPE over 3 sections; images as 8x8 patches without a temporal patch
    "ernie4_5_vl_moe": dict(image_token_id=VL_TOKENS["image"], video_token_id=VL_TOKENS["video"],
                            image_start_token_id=VL_TOKENS["start"], image_end_token_id=VL_TOKENS["end"],
                            video_start_token_id=124, video_end_token_id=125,
                            vision_config=dict(depth=2, hidden_size=32, intermediate_size=40, num_heads=2,
                                               patch_size=PATCH, spatial_merge_size=2, temporal_merge_size=2),
                            text_config=dict(_VL_TEXT, moe_num_experts=Q_EXPERTS, moe_k=3,
                                             moe_intermediate_size=[20, 28], moe_num_shared_experts=1,
                                             mlp_layer_types=_DENSE_FIRST,
                                             rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                  mrope_section=[2, 2, 2]))),
}
VL_FAMILIES = tuple(sorted(VL_KWARGS))
# Values per patch row of pixel_values (3 x temporal patch x PATCH^2; ERNIE-4.5-VL patches one frame).
VL_PATCH_VALUES = {"ernie4_5_vl_moe": 3 * PATCH * PATCH}
# Families whose MoE layers route image tokens (with their start / end markers) to vision experts by
# moe_mm_token_type_ids, which their processor returns.
VL_MOE_TOKEN_TYPES = ("ernie4_5_vl_moe",)
VL_SEQ = 14
IMAGE_MARKERS = (VL_TOKENS["start"], VL_TOKENS["image"], VL_TOKENS["end"])


def vl_batch(family: str, seed: int, rows: int = 2) -> dict:
    """A batch of a VL_FAMILIES family: `rows` rows of VL_SEQ tokens, each with one image (start, IMAGE_TOKENS image
    tokens, end) after two text tokens, row 1 left-padded by 3; random pixels; labels = the text tokens (padding and
    image markers -100); the token types the family's processor returns."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VL_TOKENS["image"], (rows, VL_SEQ), generator=gen)
    mask = torch.ones_like(ids)
    image = [VL_TOKENS["start"], *[VL_TOKENS["image"]] * IMAGE_TOKENS, VL_TOKENS["end"]]
    for r in range(rows):
        pad = 3 if r == 1 else 0
        mask[r, :pad] = 0
        ids[r, :pad] = 0
        ids[r, pad + 2: pad + 2 + len(image)] = torch.tensor(image)
    patches = rows * IMAGE_GRID[0] * IMAGE_GRID[1] * IMAGE_GRID[2]
    labels = ids.masked_fill((mask == 0) | (ids >= VL_TOKENS["image"]), -100)
    pixels = torch.randn(patches, VL_PATCH_VALUES.get(family, 3 * 2 * PATCH * PATCH), generator=gen)
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels,
                 image_grid_thw=torch.tensor([IMAGE_GRID] * rows), mm_token_type_ids=(ids == VL_TOKENS["image"]).long())
    if family in VL_MOE_TOKEN_TYPES:  # the image tokens and their markers: ERNIE-4.5-VL's processor
        batch["moe_mm_token_type_ids"] = torch.isin(ids, torch.tensor(list(IMAGE_MARKERS))).long()
    return batch


# Families kt-sft refuses (omni models, whose default configs serve), kept small on _REFUSED_SIZES: their loads
# fail from config.json alone.
_REFUSED_SIZES = dict(vocab_size=VOCAB, hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2)
REFUSED_KWARGS = {
    "qwen3_omni_moe": {},
}
# Every other family of the installed transformers (new_families(): those of a transformers newer than 5.6, and 5.6's
# gemma4 / qwen3_omni_moe_thinker): its default config (with catalog.PROBE_KWARGS) shrunk to the quirky sizes by
# attribute name, for the int attributes it has (its own activation and layout kept): _GENERIC for the language model
# (the config or its text_config), _GENERIC_TOWER for the other sub-configs (vision / audio towers: built, not fed;
# the family test's inputs are text), _GENERIC_FLAGS whatever their type; then NEW_KWARGS, what a family needs besides.
_GENERIC = dict(
    vocab_size=VOCAB, hidden_size=48, num_hidden_layers=4, num_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=12, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, unpadded_vocab_size=VOCAB,
    # widths: dense MLPs, routed experts, shared experts
    intermediate_size=40, ffn_hidden_size=40, first_dense_intermediate_size=40, moe_intermediate_size=20,
    expert_ffn_hidden_size=20, shared_expert_intermediate_size=24, moe_shared_expert_intermediate_size=24,
    shared_intermediate_size=24, share_expert_dim=24, shared_experts_intermediate_size=24,
    # routing: 6 experts, top-3, one group, a dense first layer
    num_experts=Q_EXPERTS, n_routed_experts=Q_EXPERTS, num_local_experts=Q_EXPERTS, moe_num_experts=Q_EXPERTS,
    num_experts_per_tok=3, num_experts_per_token=3, moe_topk=3, moe_k=3, top_k_experts=3, n_group=1, topk_group=1,
    num_expert_group=1, first_k_dense_replace=1, num_dense_layers=1,
    # MLA, linear attention, mamba, sparse-attention indexers
    kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, linear_key_head_dim=8,
    linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, linear_num_heads=4, linear_head_dim=12,
    mamba_d_state=4, ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=12, n_groups=1, sliding_window=8,
    index_topk=4, index_head_dim=8, index_n_heads=2, index_num_heads=2, index_kpool=2, indexer_n_heads=2,
    indexer_head_dim=12, indexer_budget=8, indexer_compress_ratio=2)
_GENERIC_TOWER = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, depth=2, n_layers=2,
                      num_attention_heads=2, num_heads=2, out_hidden_size=48, text_hidden_size=48, projection_dim=48,
                      adapter_in_dim=32, adapter_input_size=32, adapter_out_dim=48, num_local_experts=Q_EXPERTS,
                      moe_intermediate_size=20, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=40,
                      d_model=32, output_dim=48, downsample_hidden_size=16)
_GENERIC_FLAGS = dict(use_mamba_kernels=False)
NEW_KWARGS = {
    # sliding-window layers: head_dim = nope + rope parts
    "dots3_note_text": dict(head_dim=16),
    "dots3_note": dict(text_config=dict(head_dim=16)),
    # the language model of gemma4_text's hand-written config (the defaults' wide per-layer inputs train chaotically)
    "gemma4": dict(text_config=dict(QUIRKY_KWARGS["gemma4_text"], num_hidden_layers=3)),
    "glm5_next": dict(text_config=dict(num_key_value_heads=4)),  # one head of keys and values per query head
    # mamba heads dividing its inner width (2 x 48); attention layers besides (its default is all mamba)
    "granitemoehybrid": dict(mamba_n_heads=4, mamba_d_head=24, mamba_d_state=8,
                             layer_types=["linear_attention", "attention", "linear_attention", "attention"]),
    # M-RoPE sections summing to half the rotary width
    "hy_v4_vl": dict(text_config=dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                           mrope_section=[2, 1, 1]))),
    "kolibri1_1": dict(head_dim=16),  # NVFP4 rounding of keys and values: head_dim a multiple of 16
    "longcat_flash": dict(zero_expert_num=2),  # identity experts beside the routed ones, few enough to route to both
    # a 4-stage audio tower: the tiny tower keeps its 4 stages
    "muse_spark": dict(audio_config=dict(num_hidden_layers=4, hidden_sizes=[8, 16, 24, 32])),
    # its rope index reads the vision start token, which the thinker's config lacks (transformers sets it on the
    # omni config only): one inside the tiny vocabulary
    "qwen3_omni_moe_thinker": dict(vision_start_token_id=VL_TOKENS["start"]),
    "zaya": dict(num_experts_per_tok=1),  # its only routing
}
# Families whose config names no activation (their model code fixes one): built without _COMMON's hidden_act.
NO_HIDDEN_ACT = ("lfm2_moe",)
# What the configs above must produce: MoE layer indices and the shared-expert submodule of the MoE block.
MOE_LAYERS = {"qwen2_moe": [1, 2], "qwen3_moe": [1, 3], "deepseek_v2": [1, 2], "deepseek_v3": [1, 2],
              "mixtral": [0, 1, 2], "glm4_moe": [1, 2], "lfm2_moe": [1, 2]}
SHARED_EXPERT = {"qwen2_moe": "shared_expert", "deepseek_v2": "shared_experts", "deepseek_v3": "shared_experts",
                 "glm4_moe": "shared_experts"}


# Router biases that only shift which experts are chosen (sigmoid routers): a loader that drops one changes routing.
ROUTER_BIASES = ("e_score_correction_bias", "expert_bias")
# Keys the tiny checkpoints store as the family's Hub checkpoints do, where save_pretrained's name does not load
# back: DeepSeek-V4's final norm (`norm.weight`; transformers 5.25 writes `model.norm.weight`, which its own
# `.norm.` -> `.kv_norm.` renaming then misreads).
STORED_AS = {"deepseek_v4": {"model.norm.weight": "norm.weight"}}
# Buffers the model's own init sets again after loading (zaya's bias against its skip expert, [-1] = -1): as built.
KEEP_INIT = ("balancing_biases",)
# 1-D scales that multiply (gemma4's router input scale and per-expert output scale): ~1 like the norms.
ONE_CENTERED = ("router.scale", "per_expert_scale")


def tiny_config(model_type: str, **overrides):
    if model_type in VL_KWARGS:
        return AutoConfig.for_model(model_type, **{**VL_KWARGS[model_type], **overrides})
    if model_type in FAMILY_KWARGS:
        base, extra = _COMMON, FAMILY_KWARGS[model_type]
    elif model_type in QUIRKY_KWARGS:
        base, extra = _QUIRKY, QUIRKY_KWARGS[model_type]
    else:
        return AutoConfig.for_model(model_type, **_merged(generic_kwargs(model_type), overrides))
    common = {k: v for k, v in base.items() if not (k == "hidden_act" and model_type in NO_HIDDEN_ACT)}
    return AutoConfig.for_model(model_type, **{**common, **extra, **overrides})


@functools.cache
def new_families() -> tuple[str, ...]:
    """The families of the installed transformers without a hand-written config (built by generic_kwargs); a
    function, not a table: the catalog's scan of transformers' model files costs ~1.5 s, paid by the tests that ask."""
    return tuple(t for t in catalog.family_model_types()
                 if t not in (*FAMILY_KWARGS, *QUIRKY_KWARGS, *VL_KWARGS, *REFUSED_KWARGS))


def _merged(base: dict, extra: dict) -> dict:
    """`base` updated by `extra`, sub-config dicts merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def _shrunk(defaults: dict, table: dict) -> dict:
    """The attributes of a config's `defaults` (to_dict) that `table` resizes (int-valued ones), its per-layer lists
    and its sub-configs'."""
    out = {}
    layers = table.get("num_hidden_layers")
    for key, value in defaults.items():
        if isinstance(value, dict) and "model_type" in value:
            out[key] = _shrunk(value, _GENERIC if key == "text_config" else _GENERIC_TOWER)
        elif key in _GENERIC_FLAGS:
            out[key] = _GENERIC_FLAGS[key]
        elif key in table and type(value) is int and value:  # 0 means "none" (no RoPE part, no dense layer)
            out[key] = table[key]
        elif key.endswith("layer_types") and isinstance(value, list) and layers and "num_hidden_layers" in defaults:
            out[key] = _every_kind(value, layers)
        elif key == "per_layer_config" and isinstance(value, dict) and layers:  # per-layer overrides, shrunk too
            out[key] = {k: _shrunk(v, table) for k, v in value.items() if not k.isdigit() or int(k) < layers}
    if "kv_lora_rank" in defaults:  # MLA: the keys and values have every head; head_dim is the rotary part
        mla = dict(num_key_value_heads=table["num_attention_heads"], head_dim=_QUIRKY_MLA["head_dim"])
        out.update({k: v for k, v in mla.items() if k in defaults})
    return out


def _every_kind(kinds: list, n: int) -> list:
    """A per-layer list (layer_types, mlp_layer_types) of `n` layers with every kind in it: the first layer's, then
    the others in turn (a hybrid's full attention every 6th layer, MoE layers after dense ones); its first `n` when
    they have every kind already."""
    if set(kinds[:n]) == set(kinds):
        return kinds[:n]
    others = list(dict.fromkeys(kinds))[1:] or kinds[:1]
    return kinds[:1] + [others[i % len(others)] for i in range(n - 1)]


def generic_kwargs(model_type: str) -> dict:
    """The tiny config of a family without a hand-written one (new_families()): see _GENERIC."""
    probe = catalog.PROBE_KWARGS.get(model_type, {})
    defaults = AutoConfig.for_model(model_type, **probe).to_dict()
    return _merged(_merged(probe, _shrunk(defaults, _GENERIC)), NEW_KWARGS.get(model_type, {}))


def refused_config(model_type: str):
    return AutoConfig.for_model(model_type, **REFUSED_KWARGS[model_type])


def derived_family(model_type: str):
    """The family rule kt-sft derives for the tiny model of `model_type` (kt_sft.models.derive)."""
    return derive_family(build_meta(tiny_config(model_type), buffers=False), model_type)


def refusal(model_type: str) -> Optional[str]:
    """Why kt-sft refuses the family's tiny model (what its load says, from the model built on meta), or None."""
    from kt_sft.models.derive import resolve_family
    from kt_sft.models.registry import UnsupportedModelError

    try:
        resolve_family(build_meta(tiny_config(model_type), buffers=False), model_type)
    except UnsupportedModelError as err:
        return str(err)
    return None


def experts_module_names(model_type: str) -> list[str]:
    """The experts modules of the family's tiny model, from its derived rule (experts_module per MoE layer)."""
    template = derived_family(model_type).experts_module
    return [template.format(layer=i) for i in MOE_LAYERS[model_type]]


def experts_path(model_type: str) -> str:
    """The experts module's path inside a decoder layer (mlp.experts, feed_forward.experts): what PEFT's
    target_parameters name, e.g. f"{experts_path(family)}.gate_up_proj"."""
    return experts_paths(model_type)[0]


def experts_paths(model_type: str) -> list[str]:
    """Every experts module's path inside a decoder layer (ERNIE-4.5-VL: mlp.text_moe.experts and
    mlp.vision_moe.experts; other families one)."""
    return [rule.experts_module.split("{layer}.", 1)[1] for rule in derived_family(model_type).experts_sets]


@torch.no_grad()
def _reinit(model: torch.nn.Module, seed: int, expert_scale: float = 1.0) -> None:
    """Every tensor from one seeded generator, scaled so activations stay O(1) and logits are far from flat.

    Matrices ~ N(0, 1/fan_in) (the fused experts per expert: fan_in = last dim), embeddings ~ N(0, 1),
    norms and ONE_CENTERED scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.02^2), routers ~ N(0, 4/H) (spread-out router
    logits), the experts' matrices times expert_scale (EXPERT_SCALE), the
    ROUTER_BIASES of sigmoid routers ~ N(0, 0.05^2) (so a loader that drops one changes the routing).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, t in sorted(model.state_dict().items()):
        if not t.is_floating_point() or name.endswith(KEEP_INIT):
            continue
        r = torch.randn(t.shape, generator=gen, dtype=torch.float32)
        if name.endswith(ROUTER_BIASES):
            v = 0.05 * r
        elif ("norm" in name or name.endswith(ONE_CENTERED)) and t.dim() == 1:
            v = 1.0 + 0.1 * r
        elif t.dim() == 1:
            v = 0.02 * r
        elif "embed_tokens" in name:
            v = r
        elif name.endswith((".gate.weight", ".router.weight")):  # the routers (mlp.gate, phimoe's mlp.router)
            v = r * 2.0 / math.sqrt(t.shape[-1])
        else:
            v = r / math.sqrt(t.shape[-1]) * (expert_scale if ".experts." in name else 1.0)
        t.copy_(v.to(t.dtype))


def make_tiny_model(model_type: str, *, dtype=torch.float32, seed: int = 0, **overrides):
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = model_class(config).from_config(config, dtype=torch.float32)
    _reinit(model, seed, EXPERT_SCALE.get(model_type, 1.0))
    return model.to(dtype).eval()


def shard_files(path) -> list[str]:
    index = Path(path) / "model.safetensors.index.json"
    if not index.exists():
        return ["model.safetensors"]
    return sorted(set(json.loads(index.read_text())["weight_map"].values()))


def expert_keys_on_disk(path, model=None, model_type: str = "") -> dict[str, str]:
    """{expert key (per-expert or fused): shard file} from the checkpoint's index: the keys with `.experts.`, or with
    `model`, those its derived rule routes to the engine (Granite's `input_linear` too)."""
    weight_map = json.loads((Path(path) / "model.safetensors.index.json").read_text())["weight_map"]
    if model is None:
        return {k: f for k, f in weight_map.items() if ".experts." in k}
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    from kt_sft.loader import _KeyRouter

    renamings = [c for c in get_model_conversion_mapping(model) if isinstance(c, WeightRenaming)]
    router = _KeyRouter(derive_family(model, model_type), weight_map, renamings)
    return {k: f for k, f in weight_map.items() if router.expert(k) is not None}


def make_tiny_checkpoint(model_type: str, path, *, dtype=torch.float32, seed: int = 0,
                         max_shard_size="40KB"):
    """Writes a tiny random `model_type` checkpoint to `path` (config.json + sharded safetensors); returns config."""
    path = Path(path)
    model = make_tiny_model(model_type, dtype=dtype, seed=seed)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    if derive_family(model, model_type).disk_transposed:
        transpose_fused_experts(path)
    if model_type in STORED_AS:
        rename_stored(path, STORED_AS[model_type])
    experts = expert_keys_on_disk(path, model, model_type)
    assert len(set(experts.values())) > 1, f"{model_type}: routed experts fit in one shard; lower max_shard_size"
    return model.config


def rename_stored(path, renames: dict) -> None:
    """Store the tensors `renames` names under their new keys (shards and index rewritten)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    index_path = Path(path) / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted({index["weight_map"][k] for k in renames}):
        with safe_open(str(Path(path) / shard), "pt") as f:
            tensors = {renames.get(k, k): f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(Path(path) / shard), metadata={"format": "pt"})
    index["weight_map"] = {renames.get(k, k): f for k, f in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))


def transpose_fused_experts(path) -> None:
    """Store the fused experts tensors of checkpoint `path` transposed ([E, H, 2I] / [E, I, H]), as Qwen3-VL-MoE's
    Hub checkpoints do (transformers' Transpose converter takes either layout; save_pretrained writes its own)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for shard in shard_files(path):
        with safe_open(str(Path(path) / shard), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        fused = [k for k in tensors if k.endswith((".experts.gate_up_proj", ".experts.down_proj"))]
        for key in fused:
            tensors[key] = tensors[key].transpose(1, 2).contiguous()
        if fused:
            save_file(tensors, str(Path(path) / shard), metadata={"format": "pt"})
