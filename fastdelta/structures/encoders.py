"""Common-structure maps of the encoder-only architectures."""

from fastdelta.structures.mapping import StructureMap

BERT = StructureMap(
    base={
        "embeddings": "embeddings",
        "encoder": ("encoder", {
            "layer": ("block", {
                "$": {
                    "attention": ("attn", {
                        "self.query": "q",
                        "self.key": "k",
                        "self.value": "v",
                        "output.dense": "proj",
                        "output.LayerNorm": "layer_norm",
                    }),
                    "intermediate": ("ff", {"dense": "w1"}),
                    "output": ("ff", {"dense": "w2", "LayerNorm": "layer_norm"}),
                },
            }),
        }),
    },
    heads={
        "cls.predictions": ("lm_head", {"decoder": "proj"}),
    },
)

ENCODER_MAPS = {
    "bert": BERT,
}
