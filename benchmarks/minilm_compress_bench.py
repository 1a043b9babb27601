"""all-MiniLM-L6-v2: 3-layer students and head/FFN pruning, recovered by embedding distillation.

    python benchmarks/minilm_compress_bench.py --steps 300 --json results/minilm_compress.json   # ~20 min, 2 cores

Each smaller encoder is trained on ``hf.text_corpus(4000)`` (CPython's
documentation prose plus generated sentences) to reproduce the f32
teacher's embeddings (``hf.distill_embeddings``), then evaluated on the 240
held-out sentences of ``tests/hf/sentences.py``: mean cosine to the
teacher's embeddings and top-1 nearest-neighbour agreement, before and after.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "hf"))
from common import Report  # noqa: E402
from sentences import minilm_sentences  # noqa: E402

from jaxopt_serve.hf import (  # noqa: E402
    SentenceEncoder,
    bundled_minilm_dir,
    distill_embeddings,
    embedding_agreement,
    layer_student,
    text_corpus,
)
from jaxopt_serve.models import count_params  # noqa: E402
from jaxopt_serve.prune import structured_prune  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="write the tables as JSON")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    args = parser.parse_args(argv)
    directory, sentences = bundled_minilm_dir(), minilm_sentences()
    teacher = SentenceEncoder(directory)
    base = teacher.embed(sentences)
    corpus = text_corpus(4000)
    pruned = structured_prune(teacher.config, teacher.variables, {r"layer_\d+/heads": 0.5, r"layer_\d+/ffn": 0.5})
    candidates = {
        "3-layer student, teacher layers 1,3,5": layer_student(teacher.config, teacher.variables, (1, 3, 5)),
        "3-layer student, teacher layers 0,2,4": layer_student(teacher.config, teacher.variables, (0, 2, 4)),
        "half the heads and FFN neurons of every layer (L1)": (pruned.config, pruned.variables),
    }
    rows = []
    for name, (config, variables) in candidates.items():
        before = embedding_agreement(
            base, SentenceEncoder(directory, config=config, variables=variables).embed(sentences)
        )
        start = time.perf_counter()
        result = distill_embeddings(
            teacher, config, variables, corpus, steps=args.steps, learning_rate=args.learning_rate, log_every=50
        )
        seconds = time.perf_counter() - start
        after = embedding_agreement(
            base, SentenceEncoder(directory, config=config, variables=result.variables).embed(sentences)
        )
        rows.append(
            {
                "model": name,
                "encoder params": count_params(
                    {"params": {k: v for k, v in result.variables["params"].items() if k.startswith("layer_")}}
                ),
                "cosine before": before["mean_cosine"],
                "cosine after": after["mean_cosine"],
                "top-1 after": after["top1_agreement"],
                "train s": seconds,
            }
        )
    report = Report("all-MiniLM-L6-v2: smaller encoders by distillation")
    report.table(f"vs the f32 teacher on 240 held-out sentences, {args.steps} steps", rows)
    report.print()
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
