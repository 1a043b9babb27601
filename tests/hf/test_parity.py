import json
import re

import numpy as np
import pytest
from sentences import minilm_sentences

from jaxopt_serve.hf import SentenceEncoder, bundled_minilm_dir, import_bert

pytest.importorskip("tokenizers")  # the hf extra; `make test` installs it


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder(bundled_minilm_dir())


def test_embeddings_match_the_pytorch_reference(encoder):
    """Reference: benchmarks/minilm_reference.py (transformers on torch 2.13 CPU, mean pooling, L2 norm)."""
    from pathlib import Path

    with np.load(Path(__file__).parent / "minilm_reference.npz") as ref:
        reference, count = ref["embeddings"], int(ref["count"])
    sentences = minilm_sentences()
    assert len(sentences) == count >= 200
    ours = encoder.embed(sentences)
    cosine = (ours * reference).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(reference, axis=-1))
    assert cosine.min() >= 0.9999, f"worst sentence {int(cosine.argmin())}: cosine {cosine.min():.6f}"
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, rtol=1e-5)


def test_truncation_and_empty_lines(encoder):
    long_line = " ".join(["token"] * 1000)
    ids, mask = encoder.tokenize([long_line, "short"])
    assert mask[0].sum() == encoder.max_length == 256  # [CLS] + 254 word pieces + [SEP]
    assert ids.shape[1] % 32 == 0
    with pytest.raises(ValueError, match="sentence 1 is empty"):
        encoder.embed(["fine", "   "])


def _checkpoint_copy(tmp_path, edit_tensors=None, edit_config=None):
    from safetensors.numpy import load_file, save_file

    source = bundled_minilm_dir()
    tensors = load_file(str(source / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_bad_checkpoints_name_the_tensor(tmp_path):
    with pytest.raises(ValueError, match=re.escape("missing tensors: ['encoder.layer.3.output.dense.bias']")):
        import_bert(_checkpoint_copy(_dir(tmp_path, "a"), lambda t: t.pop("encoder.layer.3.output.dense.bias")))
    with pytest.raises(ValueError, match=re.escape("not used by the BERT mapping: ['cls.predictions.bias']")):
        import_bert(
            _checkpoint_copy(_dir(tmp_path, "b"), lambda t: t.update({"cls.predictions.bias": np.zeros(3, np.float32)}))
        )
    with pytest.raises(ValueError, match=r"encoder.layer.0.intermediate.dense.weight has shape \(1536, 383\)"):
        import_bert(
            _checkpoint_copy(
                _dir(tmp_path, "c"),
                lambda t: t.update({"encoder.layer.0.intermediate.dense.weight": np.zeros((1536, 383), np.float32)}),
            )
        )
    with pytest.raises(ValueError, match="unsupported architecture \\['GPT2Model'\\]"):
        import_bert(
            _checkpoint_copy(
                _dir(tmp_path, "d"),
                edit_config=lambda c: c.update({"architectures": ["GPT2Model"], "model_type": "gpt2"}),
            )
        )


def _dir(tmp_path, name):
    path = tmp_path / name
    path.mkdir()
    return path
