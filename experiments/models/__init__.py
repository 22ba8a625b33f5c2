"""Models with real offline weights, as pure functions of parameter pytrees: jmerge's BERT
(all-MiniLM-L6-v2) and MobileNetV2 (torchvision ImageNet-1k)."""

from experiments.models.bert import Bert, BertConfig, load_minilm, mean_pool, minilm_tokenizer
from experiments.models.mobilenet import MobileNetV2, load_mobilenet_v2, preprocess

__all__ = ["Bert", "BertConfig", "MobileNetV2", "load_minilm", "load_mobilenet_v2", "mean_pool", "minilm_tokenizer",
           "preprocess"]
