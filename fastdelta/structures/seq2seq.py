"""Common-structure maps of the encoder-decoder architectures."""

from fastdelta.structures.mapping import StructureMap

# T5 v1.0 (`DenseReluDense.wi`, `wo`) and v1.1 / flan-T5 (gated: `wi_0` the gate, `wi_1` the up
# projection, `wo`) share this map: each model has the keys of its own variant only. Following
# OpenDelta, `attn@`, `crossattn@` and `ff@` are the T5Layer* wrappers (`block.N.layer.M`), which
# hold the pre-LN norm and the residual; the T5Attention inside them has no common name.
T5_SELF_ATTENTION = (
    "attn",
    {
        "SelfAttention.q": "q",
        "SelfAttention.k": "k",
        "SelfAttention.v": "v",
        "SelfAttention.o": "proj",
        "layer_norm": "layer_norm",
    },
)
T5_CROSS_ATTENTION = (
    "crossattn",
    {
        "EncDecAttention.q": "q",
        "EncDecAttention.k": "k",
        "EncDecAttention.v": "v",
        "EncDecAttention.o": "proj",
        "layer_norm": "layer_norm",
    },
)
T5_FF = (
    "ff",
    {
        "DenseReluDense.wi": "w1",
        "DenseReluDense.wi_0": "w1",
        "DenseReluDense.wi_1": "w3",
        "DenseReluDense.wo": "w2",
        "layer_norm": "layer_norm",
    },
)

T5 = StructureMap(
    base={
        "shared": "embeddings",
        "encoder": (
            "encoder",
            {
                "block": (
                    "block",
                    {
                        "$": {
                            "layer.0": T5_SELF_ATTENTION,
                            "layer.1": T5_FF,
                        },
                    },
                ),
                "final_layer_norm": "layer_norm",
            },
        ),
        "decoder": (
            "decoder",
            {
                "block": (
                    "block",
                    {
                        "$": {
                            "layer.0": T5_SELF_ATTENTION,
                            "layer.1": T5_CROSS_ATTENTION,
                            "layer.2": T5_FF,
                        },
                    },
                ),
                "final_layer_norm": "layer_norm",
            },
        ),
    },
    heads={
        # T5ForConditionalGeneration has no base-model child: its `shared`, `encoder`, `decoder`
        # and `lm_head` sit side by side, and the base map applies to the rest.
        "lm_head": "lm_head.proj",
    },
)

# BART: post-LN; `fc1`/`fc2` sit directly in the layer, so no module is `ff@` (only `ff@.w1@`,
# `ff@.w2@`), and `final_layer_norm` of a layer is the FF's norm. A stack has no final norm; its
# `layernorm_embedding` (the norm after the embeddings) is the stack's `layer_norm@`, as in
# OpenDelta.
BART_ATTENTION = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "proj"}
BART_LAYER = {
    "self_attn": ("attn", BART_ATTENTION),
    "self_attn_layer_norm": "attn.layer_norm",
    "encoder_attn": ("crossattn", BART_ATTENTION),
    "encoder_attn_layer_norm": "crossattn.layer_norm",
    "fc1": "ff.w1",
    "fc2": "ff.w2",
    "final_layer_norm": "ff.layer_norm",
}

BART = StructureMap(
    base={
        "shared": "embeddings",
        "encoder": (
            "encoder",
            {
                "layers": ("block", {"$": BART_LAYER}),
                "layernorm_embedding": "layer_norm",
            },
        ),
        "decoder": (
            "decoder",
            {
                "layers": ("block", {"$": BART_LAYER}),
                "layernorm_embedding": "layer_norm",
            },
        ),
    },
    heads={
        "lm_head": "lm_head.proj",
    },
)

SEQ2SEQ_MAPS = {
    "t5": T5,
    "bart": BART,
}
