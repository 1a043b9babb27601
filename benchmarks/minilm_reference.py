"""Reference embeddings of all-MiniLM-L6-v2 from an independent implementation (PyTorch ``transformers``).

    python benchmarks/minilm_reference.py   # needs the bench and hf extras (torch, transformers)

Writes ``tests/hf/minilm_reference.npz``: the sentences (``minilm_sentences``)
and their embeddings computed by ``transformers.AutoModel`` on torch with
mean pooling and L2 normalization, as sentence-transformers configures the
model. ``tests/hf/test_parity.py`` compares jaxopt_serve's embeddings with them.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "hf"))
from sentences import minilm_sentences  # noqa: E402


def torch_embeddings(directory: str, sentences: list[str], batch_size: int = 32) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory).eval()
    out = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(
            sentences[start : start + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt"
        )
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out).astype(np.float32)


def main() -> int:
    from jaxopt_serve.hf import bundled_minilm_dir

    sentences = minilm_sentences()
    embeddings = torch_embeddings(str(bundled_minilm_dir()), sentences)
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "hf", "minilm_reference.npz")
    np.savez(path, embeddings=embeddings, count=np.asarray(len(sentences)))
    print(f"wrote {path}: {embeddings.shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
