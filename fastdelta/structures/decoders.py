"""Common-structure maps of the decoder-only architectures.

The layer list of a decoder-only model is `decoder@.block@` and its final norm
`decoder@.layer_norm@`, whether or not the model has a module of its own for the stack (OPT has
`decoder`, GPT-2 and Llama do not).
"""

from fastdelta.structures.mapping import StructureMap

# GPT-2: Conv1D layers; `c_attn` holds q, k and v in one projection, and in a cross-attention
# block (add_cross_attention=True) `q_attn` holds q and `c_attn` holds k and v.
GPT2 = StructureMap(
    base={
        "wte": "embeddings",
        "h": (
            "decoder.block",
            {
                "$": {
                    "ln_1": "attn.layer_norm",
                    "attn": ("attn", {"c_attn": "q|k|v", "c_proj": "proj"}),
                    "ln_cross_attn": "crossattn.layer_norm",
                    "crossattention": (
                        "crossattn",
                        {"q_attn": "q", "c_attn": "k|v", "c_proj": "proj"},
                    ),
                    "ln_2": "ff.layer_norm",
                    "mlp": ("ff", {"c_fc": "w1", "c_proj": "w2"}),
                },
            },
        ),
        "ln_f": "decoder.layer_norm",
    },
    heads={
        "lm_head": "lm_head.proj",
    },
)

# OPT: `fc1`/`fc2` sit directly in the layer, so no module is `ff@` (only `ff@.w1@`, `ff@.w2@`).
# `project_in`/`project_out` (present when word_embed_proj_dim != hidden_size) stay unmapped.
OPT = StructureMap(
    base={
        "decoder": (
            "decoder",
            {
                "embed_tokens": "embeddings",
                "layers": (
                    "block",
                    {
                        "$": {
                            "self_attn": (
                                "attn",
                                {
                                    "q_proj": "q",
                                    "k_proj": "k",
                                    "v_proj": "v",
                                    "out_proj": "proj",
                                },
                            ),
                            "self_attn_layer_norm": "attn.layer_norm",
                            "fc1": "ff.w1",
                            "fc2": "ff.w2",
                            "final_layer_norm": "ff.layer_norm",
                        },
                    },
                ),
                "final_layer_norm": "layer_norm",
            },
        ),
    },
    heads={
        "lm_head": "lm_head.proj",
    },
)

# Llama and the models that copy its layout (Mistral, Qwen2, Gemma): gated FF with `gate_proj`
# (w1), `up_proj` (w3) and `down_proj` (w2); pre-LN RMSNorms.
LLAMA = StructureMap(
    base={
        "embed_tokens": "embeddings",
        "layers": (
            "decoder.block",
            {
                "$": {
                    "input_layernorm": "attn.layer_norm",
                    "self_attn": (
                        "attn",
                        {
                            "q_proj": "q",
                            "k_proj": "k",
                            "v_proj": "v",
                            "o_proj": "proj",
                        },
                    ),
                    "post_attention_layernorm": "ff.layer_norm",
                    "mlp": ("ff", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}),
                },
            },
        ),
        "norm": "decoder.layer_norm",
    },
    heads={
        "lm_head": "lm_head.proj",
    },
)

DECODER_MAPS = {
    "gpt2": GPT2,
    "opt": OPT,
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "gemma": LLAMA,
}
