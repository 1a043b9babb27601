"""Distillation benchmark: a small student learns from the reference CNN; hidden states on the encoder.

    python benchmarks/distill_bench.py --json results/distill.json

For each seed: train the teacher CNN on the digits, distill a student with
about a fifth of its parameters, and train the same student from scratch on
the labels with the same steps and optimizer. Accuracies are reported as mean
and spread (population std) over the seeds, in points. The encoder section
distills a 4-layer Transformer into a 2-layer, half-width one on the digit
tokens, with logits only and with hidden states (learned projections), and
reports whether hidden states help. Writes ``{"device", "checks", "tables"}``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import Report, accuracy_pct, paired_times  # noqa: E402

from jaxopt_serve.data import load_digit_tokens, load_digits  # noqa: E402
from jaxopt_serve.demo import STUDENT  # noqa: E402
from jaxopt_serve.distill import DistillConfig, distill  # noqa: E402
from jaxopt_serve.models import CNNConfig, TransformerConfig, count_params, predict_fn  # noqa: E402
from jaxopt_serve.train import train_classifier  # noqa: E402


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": [round(v, 2) for v in values]}


def cnn_section(report: Report, *, seeds: list[int], steps: int, rounds: int) -> None:
    teacher_cfg = CNNConfig()
    student_cfg = STUDENT
    acc = {"teacher": [], "distilled student": [], "student from scratch": []}
    for seed in seeds:
        digits = load_digits(seed=seed)
        teacher, _ = train_classifier(teacher_cfg, digits, steps=steps, seed=seed, progress=False)
        kd = distill(
            teacher_cfg,
            teacher.variables,
            student_cfg,
            digits,
            steps=steps,
            seed=seed,
            val_fraction=0.0,
            progress=False,
        )
        scratch, _ = train_classifier(student_cfg, digits, steps=steps, seed=seed, progress=False)
        acc["teacher"].append(accuracy_pct(teacher_cfg, teacher.variables, digits))
        acc["distilled student"].append(accuracy_pct(student_cfg, kd.variables, digits))
        acc["student from scratch"].append(accuracy_pct(student_cfg, scratch.variables, digits))
    t_params, s_params = count_params(teacher.variables), count_params(kd.variables)
    rows = [
        {"model": name, "params": t_params if name == "teacher" else s_params, **_stats(values)}
        for name, values in acc.items()
    ]
    report.table(
        f"digits test accuracy %, {len(seeds)} seeds, {steps} steps each "
        f"(student {student_cfg.channels} / hidden {student_cfg.hidden}; T=2, alpha=0.9)",
        rows,
    )
    gap = np.mean(acc["teacher"]) - np.mean(acc["distilled student"])
    gain = np.mean(acc["distilled student"]) - np.mean(acc["student from scratch"])

    x = jnp.asarray(np.resize(digits.x_test, (256, *digits.input_shape)))
    t_fn, s_fn = jax.jit(predict_fn(teacher_cfg)), jax.jit(predict_fn(student_cfg))
    t_ms, s_ms = paired_times(
        lambda: t_fn(teacher.variables, x), lambda: s_fn(kd.variables, x), rounds=rounds, calls=20
    )
    report.table(
        "speed at batch 256, jit-compiled",
        [{"model": "teacher", "ms": t_ms}, {"model": "student", "ms": s_ms}, {"model": "speed-up", "ms": t_ms / s_ms}],
    )
    report.check("student_param_fraction", s_params / t_params, 0.25, "<=")
    report.check("acc_gap_teacher_minus_student", gap, 1.0, "<=")
    report.check("acc_gain_kd_over_scratch", gain, 0.0, ">=")
    report.check("student_speedup_b256", t_ms / s_ms, 1.0, ">=")


def encoder_section(report: Report, *, seeds: list[int], steps: int) -> None:
    tokens = load_digit_tokens()
    teacher_cfg = TransformerConfig(
        vocab_size=18, max_len=65, seq_len=65, hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128, num_classes=10
    )
    student_cfg = teacher_cfg.replace(num_layers=2, hidden_size=32, num_heads=2, mlp_dim=64)
    teacher, _ = train_classifier(teacher_cfg, tokens, steps=steps, learning_rate=1e-3, seed=0, progress=False)
    variants = {
        "logits only": DistillConfig(),
        "logits + hidden states (cosine, student 1,2 <- teacher 2,4)": DistillConfig(
            hidden_pairs=((1, 2), (2, 4)), hidden_loss="cosine", hidden_weight=1.0
        ),
    }
    acc: dict[str, list[float]] = {name: [] for name in [*variants, "from scratch"]}
    for seed in seeds:
        for name, cfg in variants.items():
            result = distill(
                teacher_cfg,
                teacher.variables,
                student_cfg,
                tokens,
                config=cfg,
                steps=steps,
                learning_rate=1e-3,
                seed=seed,
                val_fraction=0.0,
                progress=False,
            )
            acc[name].append(accuracy_pct(student_cfg, result.variables, tokens))
        scratch, _ = train_classifier(student_cfg, tokens, steps=steps, learning_rate=1e-3, seed=seed, progress=False)
        acc["from scratch"].append(accuracy_pct(student_cfg, scratch.variables, tokens))
    rows = [{"student (2 layers, width 32)": name, **_stats(values)} for name, values in acc.items()]
    rows.insert(
        0,
        {
            "student (2 layers, width 32)": "teacher (4 layers, width 64, seed 0)",
            **_stats([accuracy_pct(teacher_cfg, teacher.variables, tokens)]),
        },
    )
    report.table(f"encoder on digit tokens, test accuracy %, {len(seeds)} seeds, {steps} steps", rows)
    names = list(variants)
    report.table(
        "does hidden-state distillation help?",
        [
            {
                "hidden minus logits-only (points, mean)": float(np.mean(acc[names[1]]) - np.mean(acc[names[0]])),
                "seeds where hidden wins": int(sum(h > lo for h, lo in zip(acc[names[1]], acc[names[0]]))),
            }
        ],
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="write the checks and tables as JSON")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default: 3)")
    parser.add_argument("--steps", type=int, default=600, help="training / distillation steps")
    parser.add_argument("--rounds", type=int, default=7, help="alternating timing rounds")
    parser.add_argument("--skip", choices=["cnn", "encoder"], action="append", default=[])
    args = parser.parse_args(argv)
    seeds = list(range(args.seeds))
    report = Report("distillation benchmark")
    if "cnn" not in args.skip:
        cnn_section(report, seeds=seeds, steps=args.steps, rounds=args.rounds)
    if "encoder" not in args.skip:
        encoder_section(report, seeds=seeds, steps=args.steps)
    report.print()
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
