"""Tiny vision-language, MoE and encoder-decoder models built from configs (no downloads), and batches for them.

The vision-language batches are built by hand the way each model's processor would: the image placeholder
token repeated once per image feature the vision tower + projector produce (Llava: one per patch, Gemma 3:
`mm_tokens_per_image`, Qwen-VL: one per 2x2 merged patch, between vision start / end tokens), `pixel_values` in
the layout the vision tower reads, and the extra inputs the model needs (`image_grid_thw` and
`mm_token_type_ids` for Qwen-VL, `token_type_ids` for Gemma 3). `vlm_batch(model, images=False)` gives a text-only
batch; `vlm_collate` pads rows and concatenates their images, so a batch may also mix the two.

Builders: `tiny_vlm(family, ...)` for family in `VLM_FAMILIES`, `tiny_moe(family, ...)` for family in
`MOE_FAMILIES`, `tiny_seq2seq(family, ...)` for "t5" / "bart". Each seeds torch's global RNG with `seed`
(None: leaves it alone) and returns the model in train mode with dropout off.
"""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 64
# Special tokens of the tiny VLMs (inside the vocabulary): image placeholder, vision start / end (Qwen-VL),
# begin / end of image (Gemma 3).
IMAGE, VSTART, VEND, BOI, EOI = 60, 61, 62, 58, 59
TEXT_IDS = (3, 58)  # plain text tokens are drawn from [3, 58): never a special token


def _seeded(seed):
    if seed is not None:
        torch.manual_seed(seed)


def _text(layers, hidden=32, **kw):
    return dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)


def _qwen_vision(depth, **kw):
    return dict(depth=depth, hidden_size=16, num_heads=2, patch_size=2, temporal_patch_size=2,
                spatial_merge_size=2, in_channels=3, **kw)


def tiny_llava(layers=3, vision_layers=3, seed=0, vision_feature_layer=-2, **kw):
    """LlavaForConditionalGeneration: CLIP vision tower (8x8 images, 4x4 patches: 4 features per image, CLS
    dropped), 2-layer MLP projector, Llama language model. `vision_feature_layer=-2` (Llava's default) reads
    the second-to-last CLIP layer, so the last one is unused."""
    _seeded(seed)
    cfg = T.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32,
                           num_hidden_layers=vision_layers, num_attention_heads=2, image_size=8, patch_size=4),
        text_config=dict(model_type="llama", **_text(layers)),
        image_token_index=IMAGE, image_seq_length=4, vision_feature_layer=vision_feature_layer, **kw)
    return T.LlavaForConditionalGeneration(cfg)


def tiny_qwen2_vl(layers=3, vision_layers=3, seed=0, **kw):
    """Qwen2VLForConditionalGeneration: 8x8 images in 2x2 patches (16 patches, 4 tokens after the 2x2 merger)."""
    _seeded(seed)
    cfg = T.Qwen2VLConfig(
        vision_config=_qwen_vision(vision_layers, embed_dim=16, mlp_ratio=2) | {"hidden_size": 32},
        text_config=_text(layers, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]}),
        image_token_id=IMAGE, video_token_id=57, vision_start_token_id=VSTART, vision_end_token_id=VEND, **kw)
    return T.Qwen2VLForConditionalGeneration(cfg)


def tiny_qwen2_5_vl(layers=3, vision_layers=3, seed=0, **kw):
    """Qwen2_5_VLForConditionalGeneration (windowed vision attention; block 1 full attention)."""
    _seeded(seed)
    cfg = T.Qwen2_5_VLConfig(
        vision_config=_qwen_vision(vision_layers, intermediate_size=32, out_hidden_size=32, window_size=8,
                                   fullatt_block_indexes=[1]),
        text_config=_text(layers, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]}),
        image_token_id=IMAGE, video_token_id=57, vision_start_token_id=VSTART, vision_end_token_id=VEND, **kw)
    return T.Qwen2_5_VLForConditionalGeneration(cfg)


def tiny_qwen3_vl(layers=3, vision_layers=3, seed=0, **kw):
    """Qwen3VLForConditionalGeneration (DeepStack: vision layer 1's features also go into the language
    model through a merger of their own)."""
    _seeded(seed)
    cfg = T.Qwen3VLConfig(
        vision_config=_qwen_vision(vision_layers, intermediate_size=32, out_hidden_size=32,
                                   num_position_embeddings=16, deepstack_visual_indexes=[1]),
        text_config=_text(layers, head_dim=8, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2],
                                                               "mrope_interleaved": True}),
        image_token_id=IMAGE, video_token_id=57, vision_start_token_id=VSTART, vision_end_token_id=VEND, **kw)
    return T.Qwen3VLForConditionalGeneration(cfg)


def tiny_gemma3(layers=3, vision_layers=3, seed=0, **kw):
    """Gemma3ForConditionalGeneration: SigLIP vision tower (8x8 images, 2x2 patches: 16 patches pooled to
    `mm_tokens_per_image`=4 tokens), Gemma 3 language model (head tied to the embedding)."""
    _seeded(seed)
    cfg = T.Gemma3Config(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                           num_hidden_layers=vision_layers, num_attention_heads=2, image_size=8, patch_size=2),
        text_config=_text(layers, head_dim=8, query_pre_attn_scalar=8, sliding_window=16),
        mm_tokens_per_image=4, boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMAGE, **kw)
    return T.Gemma3ForConditionalGeneration(cfg)


VLM_BUILDERS = {
    "llava": tiny_llava,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "gemma3": tiny_gemma3,
}
if hasattr(T, "Qwen3VLForConditionalGeneration"):
    VLM_BUILDERS["qwen3_vl"] = tiny_qwen3_vl
VLM_FAMILIES = tuple(VLM_BUILDERS)


def _built(builders: dict, family: str, layers: int, **kw):
    """A model of `family` from `builders`, without a KV cache (training), in train mode."""
    model = builders[family](layers, **kw)
    model.config.use_cache = False
    return model.train()


def tiny_vlm(family: str, layers: int = 3, **kw):
    return _built(VLM_BUILDERS, family, layers, **kw)


def _image_block(model) -> list[int]:
    """The token ids the processor puts in place of one image."""
    kind = model.config.model_type
    if kind == "llava":
        return [IMAGE] * 4
    if kind == "gemma3":
        return [BOI] + [IMAGE] * model.config.mm_tokens_per_image + [EOI]
    return [VSTART] + [IMAGE] * 4 + [VEND]  # Qwen-VL: 16 patches of 2x2, merged 2x2 -> 4 tokens


def _pixels(model, g: torch.Generator) -> dict:
    """One image, in the layout the vision tower reads (a leading axis that batches concatenate along)."""
    kind = model.config.model_type
    if kind in ("llava", "gemma3"):
        return {"pixel_values": torch.randn(1, 3, 8, 8, generator=g)}
    # Qwen-VL: flattened patches (C x temporal x patch x patch each), grid (t, h, w) in patches per image.
    vc = model.config.vision_config
    per = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    return {"pixel_values": torch.randn(16, per, generator=g), "image_grid_thw": torch.tensor([[1, 4, 4]])}


def vlm_row(model, image: bool, g: torch.Generator, seq: int = 12) -> dict:
    """One example: a short prompt, the image's placeholder tokens (when `image`), more text; labels are the
    inputs with the image's special tokens masked (-100)."""
    text = torch.randint(*TEXT_IDS, (seq,), generator=g).tolist()
    ids = torch.tensor(text[:3] + _image_block(model) + text[3:] if image else text)
    labels = ids.clone()
    labels[(ids == IMAGE) | (ids == VSTART) | (ids == VEND) | (ids == BOI) | (ids == EOI)] = -100
    row = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    if model.config.model_type == "gemma3":
        row["token_type_ids"] = (ids == IMAGE).long()
    elif model.config.model_type != "llava":  # Qwen-VL: 1 marks image tokens (the processor's mm_token_type_ids)
        row["mm_token_type_ids"] = (ids == IMAGE).long()
    if image:
        row |= _pixels(model, g)
    return row


_PAD = {"labels": -100}  # right padding: 0 (the pad token, attention 0, token type 0) except for the labels
_IMAGE_KEYS = ("pixel_values", "image_grid_thw")


def vlm_collate(rows: list[dict]) -> dict:
    """Right-pad the token fields; concatenate the images of the rows that have one (the processors' layout),
    so one batch may mix image and text-only rows."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {}
    for k in rows[0]:
        if k in _IMAGE_KEYS:
            continue
        out[k] = torch.stack([torch.nn.functional.pad(r[k], (0, width - len(r[k])), value=_PAD.get(k, 0))
                              for r in rows])
    for k in _IMAGE_KEYS:
        have = [r[k] for r in rows if k in r]
        if have:
            out[k] = torch.cat(have)
    return out


def vlm_batch(model, images: bool = True, batch: int = 2, seed: int = 0) -> dict:
    """A batch of `batch` rows, each with one image (`images=True`) or text only (`False`)."""
    g = torch.Generator().manual_seed(seed)
    return vlm_collate([vlm_row(model, images, g) for _ in range(batch)])


class VLMDataset(torch.utils.data.Dataset):
    """`n` rows for the Trainer (with `vlm_collate`); row i has an image when `pattern[i % len(pattern)]`."""

    def __init__(self, model, n: int = 16, pattern=(True, False), seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.rows = [vlm_row(model, pattern[i % len(pattern)], g) for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


# --- MoE -------------------------------------------------------------------------------------------------------


def _moe_text(layers, **kw):
    return _text(layers, **kw) | {"num_experts_per_tok": 2, "output_router_logits": True,
                                  "router_aux_loss_coef": 0.1}


def tiny_qwen3_moe(layers=2, seed=0, **kw):
    _seeded(seed)
    return T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**_moe_text(layers, head_dim=8, num_experts=4,
                                                               moe_intermediate_size=16, **kw)))


def tiny_qwen2_moe(layers=2, seed=0, **kw):
    _seeded(seed)
    return T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**_moe_text(layers, num_experts=4, moe_intermediate_size=16,
                                                               shared_expert_intermediate_size=32, **kw)))


def tiny_mixtral(layers=2, seed=0, **kw):
    _seeded(seed)
    return T.MixtralForCausalLM(T.MixtralConfig(**_moe_text(layers, num_local_experts=4, **kw)))


def tiny_deepseek_v3(layers=2, seed=0, **kw):
    """DeepSeek-V3: layer 0 dense (first_k_dense_replace=1), the rest MoE with one shared expert."""
    _seeded(seed)
    cfg = _text(layers) | dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                               n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                               kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
                               v_head_dim=8, **kw)
    return T.DeepseekV3ForCausalLM(T.DeepseekV3Config(**cfg))


def tiny_gpt_oss(layers=2, seed=0, **kw):
    _seeded(seed)
    cfg = _moe_text(layers, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=8, **kw)
    cfg["intermediate_size"] = 16
    return T.GptOssForCausalLM(T.GptOssConfig(**cfg))


MOE_BUILDERS = {"qwen3_moe": tiny_qwen3_moe, "qwen2_moe": tiny_qwen2_moe, "mixtral": tiny_mixtral}
if hasattr(T, "DeepseekV3ForCausalLM"):
    MOE_BUILDERS["deepseek_v3"] = tiny_deepseek_v3
if hasattr(T, "GptOssForCausalLM"):
    MOE_BUILDERS["gpt_oss"] = tiny_gpt_oss
MOE_FAMILIES = tuple(MOE_BUILDERS)


def tiny_moe(family: str, layers: int = 2, **kw):
    return _built(MOE_BUILDERS, family, layers, **kw)


# --- encoder-decoder -------------------------------------------------------------------------------------------


def tiny_seq2seq(family: str, layers: int = 2, seed: int = 0, **kw):
    """T5ForConditionalGeneration (`layers` encoder and decoder blocks, shared embedding tied to the head) or
    BartForConditionalGeneration."""
    _seeded(seed)
    if family == "t5":
        cfg = T.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=layers, num_heads=4,
                         dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **kw)
        model = T.T5ForConditionalGeneration(cfg)
    else:
        cfg = T.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=layers, decoder_layers=layers,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                           activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                           decoder_start_token_id=2, forced_eos_token_id=2, **kw)
        model = T.BartForConditionalGeneration(cfg)
    model.config.use_cache = False
    return model.train()


def seq2seq_batch(batch: int = 2, src: int = 10, tgt: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, VOCAB, (batch, src), generator=g),
            "labels": torch.randint(3, VOCAB, (batch, tgt), generator=g)}


def lm_batch(batch: int = 2, seq: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}
