"""Common-structure maps of the encoder-only architectures."""

from fastdelta.structures.mapping import StructureMap

BERT = StructureMap(
    base={
        "embeddings": "embeddings",
        "encoder": (
            "encoder",
            {
                "layer": (
                    "block",
                    {
                        "$": {
                            "attention": (
                                "attn",
                                {
                                    "self.query": "q",
                                    "self.key": "k",
                                    "self.value": "v",
                                    "output.dense": "proj",
                                    "output.LayerNorm": "layer_norm",
                                },
                            ),
                            "intermediate": ("ff", {"dense": "w1"}),
                            "output": ("ff", {"dense": "w2", "LayerNorm": "layer_norm"}),
                        },
                    },
                ),
            },
        ),
    },
    heads={
        "cls.predictions": ("lm_head", {"decoder": "proj"}),
    },
)

# RoBERTa's encoder has BERT's module names; only its MLM head differs.
ROBERTA = StructureMap(
    base=BERT.base,
    heads={
        "lm_head": ("lm_head", {"decoder": "proj"}),
    },
)

# DistilBERT: q/k/v/out sit directly in `attention`; the post-LN norms sit in the layer.
DISTILBERT = StructureMap(
    base={
        "embeddings": "embeddings",
        "transformer": (
            "encoder",
            {
                "layer": (
                    "block",
                    {
                        "$": {
                            "attention": (
                                "attn",
                                {
                                    "q_lin": "q",
                                    "k_lin": "k",
                                    "v_lin": "v",
                                    "out_lin": "proj",
                                },
                            ),
                            "sa_layer_norm": "attn.layer_norm",
                            "ffn": ("ff", {"lin1": "w1", "lin2": "w2"}),
                            "output_layer_norm": "ff.layer_norm",
                        },
                    },
                ),
            },
        ),
    },
    heads={
        # The MLM head's modules sit directly in DistilBertForMaskedLM.
        "vocab_projector": "lm_head.proj",
    },
)

# DeBERTa-v2/v3: BERT's layout with `*_proj` names; `pos_key_proj`/`pos_query_proj` (relative
# position projections), `encoder.rel_embeddings` and `encoder.LayerNorm` (the norm of the
# relative embeddings) stay unmapped.
DEBERTA_V2 = StructureMap(
    base={
        "embeddings": "embeddings",
        "encoder": (
            "encoder",
            {
                "layer": (
                    "block",
                    {
                        "$": {
                            "attention": (
                                "attn",
                                {
                                    "self.query_proj": "q",
                                    "self.key_proj": "k",
                                    "self.value_proj": "v",
                                    "output.dense": "proj",
                                    "output.LayerNorm": "layer_norm",
                                },
                            ),
                            "intermediate": ("ff", {"dense": "w1"}),
                            "output": ("ff", {"dense": "w2", "LayerNorm": "layer_norm"}),
                        },
                    },
                ),
            },
        ),
    },
    heads={
        # config.legacy=True (the default): BERT's head, with a `decoder` Linear to the vocabulary.
        "cls.predictions": ("lm_head", {"decoder": "proj"}),
        # config.legacy=False: the vocabulary projection is a matmul with the word embeddings,
        # not a module, so this head has no `proj@` (its `dense` is a hidden-to-hidden transform).
        "lm_predictions.lm_head": "lm_head",
    },
)

ENCODER_MAPS = {
    "bert": BERT,
    "roberta": ROBERTA,
    "distilbert": DISTILBERT,
    "deberta-v2": DEBERTA_V2,
}
