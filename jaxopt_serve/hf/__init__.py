"""Pretrained checkpoints: BERT-family import (safetensors) and sentence embeddings (the ``hf`` extra)."""

from jaxopt_serve.hf.bert import bert_mapping, config_from_hf, import_bert
from jaxopt_serve.hf.sentence import SentenceEncoder, bundled_minilm_dir

__all__ = ["SentenceEncoder", "bert_mapping", "bundled_minilm_dir", "config_from_hf", "import_bert"]
