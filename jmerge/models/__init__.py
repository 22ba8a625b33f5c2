"""Small Flax models used by the experiments and tests."""

from jmerge.models.bert import Bert, BertConfig, load_minilm, mean_pool, minilm_tokenizer

__all__ = ["Bert", "BertConfig", "load_minilm", "mean_pool", "minilm_tokenizer"]
