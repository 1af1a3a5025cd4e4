"""Qwen2.5-VL model configs (ml-collections) and conversion to/from Hugging Face config.json.

`get_config('3b' | '7b')` carries the exact values of the released Qwen2.5-VL-3B/7B-Instruct
config.json files; `get_config('tiny')` is a random-weight test size that still exercises window
attention (merged grid larger than one window) and a full-attention vision block.
"""

from __future__ import annotations

import copy
from typing import Any

import ml_collections

ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
MODEL_TYPE = "qwen2_5_vl"

_RELEASED = {
    "3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, intermediate_size=11008, vocab_size=151936,
               tie_word_embeddings=True, out_hidden_size=2048),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
               tie_word_embeddings=False, out_hidden_size=3584),
}


def _text(hidden, layers, heads, kv_heads, inter, vocab, tie, mrope, max_pos):
    t = ml_collections.ConfigDict()
    t.hidden_size = hidden  # decoder width
    t.num_hidden_layers = layers  # decoder blocks
    t.num_attention_heads = heads  # query heads
    t.num_key_value_heads = kv_heads  # key/value heads (GQA groups)
    t.head_dim = hidden // heads  # per-head width (transformers derives it as hidden // heads)
    t.intermediate_size = inter  # SwiGLU hidden width
    t.vocab_size = vocab  # embedding / lm_head rows
    t.rope_theta = 1_000_000.0  # rotary base of the decoder
    t.rms_norm_eps = 1e-6  # RMSNorm epsilon of the decoder
    t.mrope_section = tuple(mrope)  # rotary frequency split over (t, h, w); sums to head_dim/2
    t.tie_word_embeddings = tie  # lm_head shares the embedding matrix
    t.max_position_embeddings = max_pos  # longest position the released model was trained for
    return t


def _vision(depth, hidden, heads, inter, out_hidden, window, fullatt, patch=14):
    v = ml_collections.ConfigDict()
    v.depth = depth  # vision transformer blocks
    v.hidden_size = hidden  # vision width
    v.num_heads = heads  # vision attention heads (head_dim = hidden // heads)
    v.intermediate_size = inter  # vision gated-MLP width
    v.in_channels = 3  # RGB
    v.patch_size = patch  # spatial patch side in pixels
    v.temporal_patch_size = 2  # frames per temporal patch
    v.spatial_merge_size = 2  # merger groups merge x merge patches into one LLM token
    v.window_size = window  # window side in pixels for windowed attention blocks
    v.fullatt_block_indexes = tuple(fullatt)  # blocks attending over the whole frame
    v.out_hidden_size = out_hidden  # merger output width (= text hidden_size)
    v.tokens_per_second = 2  # temporal rope positions per second of video
    v.rope_theta = 10000.0  # base of the 2D vision rotary embedding
    v.rms_norm_eps = 1e-6  # RMSNorm epsilon in the vision tower and merger
    return v


def get_config(size: str = "tiny") -> ml_collections.ConfigDict:
    """Model config for 'tiny' | '3b' | '7b'."""
    c = ml_collections.ConfigDict()
    if size in _RELEASED:
        r = _RELEASED[size]
        c.text = _text(r["hidden_size"], r["num_hidden_layers"], r["num_attention_heads"],
                       r["num_key_value_heads"], r["intermediate_size"], r["vocab_size"],
                       r["tie_word_embeddings"], (16, 24, 24), 128000)
        c.vision = _vision(32, 1280, 16, 3420, r["out_hidden_size"], 112, (7, 15, 23, 31))
        c.image_token_id = 151655  # <|image_pad|>
        c.video_token_id = 151656  # <|video_pad|>
        c.vision_start_token_id = 151652  # <|vision_start|>
        c.vision_end_token_id = 151653  # <|vision_end|>
    elif size == "tiny":
        # head_dim 16 -> mrope sections sum to 8. Vision window 56 px = 2x2 merge groups, so any
        # frame larger than 56x56 px spans several windows; block 1 attends over the whole frame.
        c.text = _text(64, 2, 4, 2, 128, 512, False, (2, 3, 3), 4096)
        c.vision = _vision(3, 32, 2, 64, 64, 56, (1,))
        c.image_token_id = 505
        c.video_token_id = 506
        c.vision_start_token_id = 502
        c.vision_end_token_id = 503
    else:
        raise ValueError(f"model config: unknown size {size!r}; expected 'tiny', '3b' or '7b'")
    c.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16'
    c.param_dtype = "float32"  # parameter storage dtype: 'float32' | 'bfloat16'
    c.remat = False  # rematerialise each decoder / vision block in the backward pass
    c.scan_layers = False  # stack decoder layers and run them with nnx.scan (faster compile)
    # decoder attention computes the float32 scores this many query rows at a time (0 = all at
    # once): bounds activation memory of long prefills and learner steps, and keeps a chunk of
    # scores in cache on CPU (models/text.py `attend`)
    c.attn_query_chunk = 64
    # training losses project the final hidden states to the vocabulary this many positions at
    # a time (0 = the whole row at once): float32 logits of a 20k-token row over a 152k vocab
    # are ~12 GB before the softmax and its gradient (train/losses.py chunked_token_stats)
    c.lm_head_chunk = 0
    # training steps keep the residual stream between decoder layers split over the tensor axis
    # by tokens (sequence parallelism): the remat carries of a 20k-token row are 28 x 20k x
    # hidden per chip without it (sharding.py rule 'seq_shard')
    c.seq_parallel = False
    return c


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks the invariants the model relies on; returns cfg."""
    t, v = cfg.text, cfg.vision
    if t.hidden_size != t.num_attention_heads * t.head_dim:
        raise ValueError(f"model config: text.hidden_size {t.hidden_size} != heads "
                         f"{t.num_attention_heads} x head_dim {t.head_dim}")
    if t.num_attention_heads % t.num_key_value_heads:
        raise ValueError("model config: text.num_attention_heads must be a multiple of "
                         "text.num_key_value_heads")
    if sum(t.mrope_section) * 2 != t.head_dim:
        raise ValueError(f"model config: text.mrope_section {tuple(t.mrope_section)} must sum to "
                         f"head_dim / 2 = {t.head_dim // 2}")
    if v.hidden_size % v.num_heads or (v.hidden_size // v.num_heads) % 4:
        raise ValueError("model config: vision head_dim must be an integer multiple of 4")
    if v.out_hidden_size != t.hidden_size:
        raise ValueError(f"model config: vision.out_hidden_size {v.out_hidden_size} != "
                         f"text.hidden_size {t.hidden_size}")
    if v.window_size % (v.spatial_merge_size * v.patch_size):
        raise ValueError("model config: vision.window_size must be a multiple of "
                         "patch_size * spatial_merge_size")
    for name in ("dtype", "param_dtype"):
        if cfg[name] not in ("float32", "bfloat16"):
            raise ValueError(f"model config: {name} must be 'float32' or 'bfloat16', "
                             f"got {cfg[name]!r}")
    return cfg


# compute knobs of `get_config` added after the first checkpoints were written: a config.json
# from before them lacks them (`Qwen25VLConfig.from_configdict` fills them in)
LATER_KNOBS = ("attn_query_chunk", "lm_head_chunk", "seq_parallel")


class Qwen25VLConfig:
    """Namespace for config helpers used by the trainer (`from_configdict`)."""

    @staticmethod
    def from_configdict(d) -> ml_collections.ConfigDict:
        """A validated, unlocked copy of a model ConfigDict (or plain dict of the same layout,
        e.g. a checkpoint's config.json); compute knobs newer than the dict (`LATER_KNOBS`)
        take `get_config`'s values."""
        cfg = ml_collections.ConfigDict(d.to_dict() if hasattr(d, "to_dict") else dict(d))
        defaults = get_config("tiny")
        for key in LATER_KNOBS:
            if key not in cfg:
                cfg[key] = defaults[key]
        cfg.text.mrope_section = tuple(cfg.text.mrope_section)
        cfg.vision.fullatt_block_indexes = tuple(cfg.vision.fullatt_block_indexes)
        return validate(cfg)


# --- Hugging Face config.json -------------------------------------------------------------------


def _need(d: dict, key: str, where: str):
    if key not in d:
        raise ValueError(f"config.json: missing field {where}{key}")
    return d[key]


def from_hf_config(d: dict[str, Any], *, dtype: str = "float32",
                   param_dtype: str | None = None) -> ml_collections.ConfigDict:
    """Model config from a Hugging Face Qwen2.5-VL config.json dict.

    Accepts the released layout (flat text fields, `rope_scaling: {type: mrope, mrope_section}`,
    vision `in_chans`) and the transformers-5 layout (`text_config` with `rope_parameters`).
    """
    archs = d.get("architectures") or []
    model_type = d.get("model_type")
    if model_type != MODEL_TYPE and ARCHITECTURE not in archs:
        raise ValueError(f"config.json: not a Qwen2.5-VL model (model_type={model_type!r}, "
                         f"architectures={archs!r}); expected model_type {MODEL_TYPE!r}")
    if "text_config" in d and isinstance(d["text_config"], dict):
        t, where = d["text_config"], "text_config."
    else:
        t, where = d, ""
    rope = t.get("rope_parameters") or t.get("rope_scaling") or d.get("rope_scaling") or {}
    mrope = rope.get("mrope_section")
    if mrope is None:
        raise ValueError(f"config.json: missing {where}rope_parameters.mrope_section "
                         "(or rope_scaling.mrope_section)")
    theta = rope.get("rope_theta", t.get("rope_theta", 1_000_000.0))
    vd = _need(d, "vision_config", "")
    hidden = int(_need(t, "hidden_size", where))
    heads = int(_need(t, "num_attention_heads", where))
    tie = bool(d.get("tie_word_embeddings", False) or t.get("tie_word_embeddings", False))
    c = get_config("tiny")
    c.text = _text(hidden, int(_need(t, "num_hidden_layers", where)), heads,
                   int(t.get("num_key_value_heads") or heads),
                   int(_need(t, "intermediate_size", where)), int(_need(t, "vocab_size", where)),
                   tie, [int(x) for x in mrope], int(t.get("max_position_embeddings", 32768)))
    c.text.rope_theta = float(theta)
    c.text.rms_norm_eps = float(t.get("rms_norm_eps", 1e-6))
    vw = "vision_config."
    vrope = vd.get("rope_parameters") or {}
    c.vision = _vision(int(_need(vd, "depth", vw)), int(_need(vd, "hidden_size", vw)),
                       int(_need(vd, "num_heads", vw)), int(_need(vd, "intermediate_size", vw)),
                       int(vd.get("out_hidden_size", hidden)), int(vd.get("window_size", 112)),
                       [int(i) for i in vd.get("fullatt_block_indexes", (7, 15, 23, 31))],
                       int(vd.get("patch_size", vd.get("spatial_patch_size", 14))))
    c.vision.in_channels = int(vd.get("in_channels", vd.get("in_chans", 3)))
    c.vision.temporal_patch_size = int(vd.get("temporal_patch_size", 2))
    c.vision.spatial_merge_size = int(vd.get("spatial_merge_size", 2))
    c.vision.tokens_per_second = int(vd.get("tokens_per_second", 2))
    c.vision.rope_theta = float(vrope.get("rope_theta", 10000.0))
    for key in ("image_token_id", "video_token_id", "vision_start_token_id",
                "vision_end_token_id"):
        c[key] = int(_need(d, key, ""))
    c.dtype = dtype
    c.param_dtype = param_dtype or dtype
    return validate(c)


def to_hf_config(cfg: ml_collections.ConfigDict, *, torch_dtype: str | None = None) -> dict:
    """A transformers-5 layout config.json dict that `Qwen2_5_VLConfig` loads."""
    t, v = cfg.text, cfg.vision
    dtype = torch_dtype or cfg.param_dtype
    text = {
        "model_type": "qwen2_5_vl_text",
        "hidden_size": t.hidden_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "intermediate_size": t.intermediate_size,
        "vocab_size": t.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                            "mrope_section": list(t.mrope_section)},
        "tie_word_embeddings": t.tie_word_embeddings,
        # released <|endoftext|> / <|im_end|>; omitted for vocabularies too small to hold them
        "bos_token_id": 151643 if t.vocab_size > 151643 else None,
        "eos_token_id": 151645 if t.vocab_size > 151645 else None,
        "dtype": dtype,
    }
    vision = {
        "model_type": "qwen2_5_vl_vision",
        "depth": v.depth,
        "hidden_size": v.hidden_size,
        "num_heads": v.num_heads,
        "intermediate_size": v.intermediate_size,
        "hidden_act": "silu",
        "in_channels": v.in_channels,
        "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size,
        "spatial_merge_size": v.spatial_merge_size,
        "window_size": v.window_size,
        "fullatt_block_indexes": list(v.fullatt_block_indexes),
        "out_hidden_size": v.out_hidden_size,
        "tokens_per_second": v.tokens_per_second,
        "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        "dtype": dtype,
    }
    return copy.deepcopy({
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "text_config": text,
        "vision_config": vision,
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
        "tie_word_embeddings": t.tie_word_embeddings,
        "dtype": dtype,
    })
