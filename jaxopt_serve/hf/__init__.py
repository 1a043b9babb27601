"""Pretrained checkpoints: BERT-family import (safetensors), sentence embeddings and their compression
(``hf`` extra)."""

from jaxopt_serve.hf.bert import bert_mapping, config_from_hf, import_bert
from jaxopt_serve.hf.compress import distill_embeddings, embedding_agreement, layer_student
from jaxopt_serve.hf.corpus import text_corpus
from jaxopt_serve.hf.sentence import LENGTH_AXES, SentenceEncoder, bundled_minilm_dir, embedding_model

__all__ = [
    "LENGTH_AXES",
    "SentenceEncoder",
    "bert_mapping",
    "bundled_minilm_dir",
    "config_from_hf",
    "distill_embeddings",
    "embedding_agreement",
    "embedding_model",
    "import_bert",
    "layer_student",
    "text_corpus",
]
