import numpy as np
import pytest

pytest.importorskip("tokenizers")

from jaxopt_serve.hf import (  # noqa: E402
    SentenceEncoder,
    bundled_minilm_dir,
    distill_embeddings,
    embedding_agreement,
    layer_student,
    text_corpus,
)
from jaxopt_serve.hf.corpus import documentation_sentences, generated_sentences  # noqa: E402
from jaxopt_serve.prune import structured_prune  # noqa: E402

SENTENCES = [
    "A man is eating food.",
    "Someone is having lunch.",
    "The stock market fell sharply today.",
    "Prices dropped on Wall Street.",
]


@pytest.fixture(scope="module")
def teacher():
    return SentenceEncoder(bundled_minilm_dir())


def test_corpus_is_offline_deterministic_and_disjoint_from_the_eval_sentences():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from sentences import minilm_sentences

    corpus = text_corpus(600)
    assert corpus == text_corpus(600) and len(set(corpus)) == 600
    assert len(documentation_sentences()) > 500  # CPython's pydoc_data prose
    assert not set(corpus) & set(minilm_sentences())
    with pytest.raises(ValueError, match="size"):
        text_corpus(0)
    assert generated_sentences(5, seed=1) != generated_sentences(5, seed=2)


def test_pruned_encoder_runs_with_its_own_config(teacher):
    pruned = structured_prune(teacher.config, teacher.variables, {r"layer_\d+/heads": 0.25, r"layer_\d+/ffn": 0.25})
    assert pruned.config.num_heads == (9,) * 6 and pruned.config.mlp_dim == (1152,) * 6
    small = SentenceEncoder(bundled_minilm_dir(), config=pruned.config, variables=pruned.variables)
    base, emb = teacher.embed(SENTENCES), small.embed(SENTENCES)
    assert emb.shape == base.shape
    assert embedding_agreement(base, emb)["mean_cosine"] > 0.5
    with pytest.raises(
        ValueError, match=r"params/layer_0/attention/.* has shape \(9, 32\), the given config needs \(12, 32\)"
    ):
        SentenceEncoder(bundled_minilm_dir(), config=teacher.config, variables=pruned.variables)


def test_layer_student_distillation_moves_toward_the_teacher(teacher):
    config, variables = layer_student(teacher.config, teacher.variables, [5])
    assert config.num_layers == 1
    np.testing.assert_array_equal(
        variables["params"]["layer_0"]["output"]["kernel"], teacher.variables["params"]["layer_5"]["output"]["kernel"]
    )
    corpus = text_corpus(64)
    result = distill_embeddings(
        teacher, config, variables, corpus, steps=12, batch_size=8, max_tokens=32, learning_rate=1e-3, log_every=4
    )
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(
        result.variables["params"]["word_embeddings"]["embedding"], variables["params"]["word_embeddings"]["embedding"]
    )  # frozen
    with pytest.raises(ValueError, match="distinct"):
        layer_student(teacher.config, teacher.variables, [0, 0])
    with pytest.raises(ValueError, match="hidden_size"):
        distill_embeddings(teacher, config.replace(hidden_size=64), variables, corpus, steps=1)


def test_embedding_agreement_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="cannot be compared"):
        embedding_agreement(np.eye(3), np.eye(4))
