"""Pruning benchmark: artifact size, accuracy and speed of pruned models against f32, in one run.

    python benchmarks/prune_bench.py --json results/prune.json

Prints tables and the acceptance checks of the pruning chapter and writes
``{"device", "checks": [{"name", "value", "target", "op", "passed"}], "tables"}``.
Size ratios are f32 artifact bytes / pruned artifact bytes on disk; accuracy
drops are in points on the digits test split; speed-ups are unpruned time /
pruned time, jit-compiled, measured in alternating rounds in the same process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import Report, accuracy_pct, paired_times  # noqa: E402

from jaxopt_serve.artifact import load_artifact, save_artifact  # noqa: E402
from jaxopt_serve.data import load_digits  # noqa: E402
from jaxopt_serve.models import CNNConfig, MLPConfig, init_variables, predict_fn  # noqa: E402
from jaxopt_serve.prune import deep_compress, structured_prune  # noqa: E402
from jaxopt_serve.prune.pipeline import structured, unstructured  # noqa: E402
from jaxopt_serve.train import train_classifier  # noqa: E402


def accuracy_section(report: Report, *, steps: int, finetune_steps: int, gradual_steps: int, seed: int) -> None:
    digits = load_digits(seed=seed)
    out = tempfile.mkdtemp(prefix="prune_bench_")
    sizes, accs, criteria = [], [], []
    for name, config in [("cnn", CNNConfig()), ("mlp", MLPConfig())]:
        artifact, _ = train_classifier(config, digits, steps=steps, seed=seed, progress=False)
        base = 100.0 * artifact.metadata["test_accuracy"]
        f32_bytes = save_artifact(os.path.join(out, f"{name}_f32.jxs"), artifact)

        deep = deep_compress(
            config, artifact.variables, digits, sparsity=0.9, bits="int4", finetune_steps=gradual_steps, seed=seed
        )
        path = os.path.join(out, f"{name}_sparse90_int4.jxs")
        sparse_bytes = save_artifact(path, deep.artifact)
        loaded = load_artifact(path)
        deep_acc = accuracy_pct(config, loaded.variables, digits)
        sizes.append(
            {
                "model": name,
                "f32 bytes": f32_bytes,
                "90% sparse + int4 bytes": sparse_bytes,
                "ratio": f32_bytes / sparse_bytes,
                "kernel sparsity": deep.sparsity,
            }
        )
        report.check(f"size_ratio_sparse90_int4_{name}", f32_bytes / sparse_bytes, 20.0, ">=")

        pruned = structured(config, artifact.variables, digits, sparsity=0.5, finetune_steps=finetune_steps, seed=seed)
        struct_acc = accuracy_pct(pruned.config, pruned.variables, digits)
        accs += [
            {"model": name, "variant": "f32", "accuracy %": base, "drop (points)": 0.0},
            {
                "model": name,
                "variant": "90% unstructured (gradual) + int4, from the sparse artifact",
                "accuracy %": deep_acc,
                "drop (points)": base - deep_acc,
            },
            {
                "model": name,
                "variant": f"50% structured -> {_widths(pruned.config)}, fine-tuned",
                "accuracy %": struct_acc,
                "drop (points)": base - struct_acc,
            },
        ]
        report.check(f"acc_drop_sparse90_int4_{name}", base - deep_acc, 1.0, "<=")
        report.check(f"acc_drop_structured50_{name}", base - struct_acc, 1.5, "<=")

        # One-shot criteria at 80% (and 2:4), no fine-tuning: what each criterion keeps.
        for method in ("magnitude", "importance", "random", "nm"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # N:M groups input channels: the first conv has one, so it stays dense.
                pattern = r"params/(?!conv_0/)(.*/)?kernel" if method == "nm" else r"params/(.*/)?kernel"
                v, result = unstructured(
                    config,
                    artifact.variables,
                    digits,
                    sparsity=0.8,
                    method=method,
                    scope="global",
                    pattern=pattern,
                    seed=seed,
                )
            criteria.append(
                {
                    "model": name,
                    "criterion": method if method != "nm" else "2:4 magnitude",
                    "sparsity": result.overall,
                    "accuracy % (no fine-tuning)": accuracy_pct(config, v, digits),
                }
            )
    report.table("artifact size on disk", sizes)
    report.table("digits test accuracy", accs)
    report.table("one-shot unstructured pruning, global scope, no fine-tuning", criteria)


def _widths(config) -> str:
    return str(getattr(config, "channels", None) or config.features)


def speed_section(report: Report, *, rounds: int) -> None:
    rng = np.random.default_rng(0)
    rows = []
    cases = [
        ("cnn 224x224x3", CNNConfig(in_channels=3, example_size=224), 16, (224, 224, 3)),
        ("mlp 4096x2", MLPConfig(features=(4096, 4096), input_shape=(4096,)), 256, (4096,)),
    ]
    for name, config, batch, shape in cases:
        variables = init_variables(config, 0, shape)
        pruned = structured_prune(config, variables, 0.5)
        dense_fn, small_fn = jax.jit(predict_fn(config)), jax.jit(predict_fn(pruned.config))
        x = jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
        calls = 2 if name.startswith("cnn") else 5
        t_dense, t_small = paired_times(
            lambda: dense_fn(variables, x),  # noqa: B023 - called in this iteration
            lambda: small_fn(pruned.variables, x),  # noqa: B023 - called in this iteration
            rounds=rounds,
            calls=calls,
        )
        rows.append(
            {
                "model": name,
                "batch": batch,
                "variant": f"50% structured -> {_widths(pruned.config)}",
                "unpruned ms": t_dense,
                "pruned ms": t_small,
                "speed-up": t_dense / t_small,
            }
        )
        # 90% unstructured: same dense shapes, zeros inside; XLA's dense kernels do not skip them.
        masked = jax.device_put(
            jax.tree.map(lambda a: np.where(rng.uniform(size=a.shape) < 0.9, 0, a).astype(a.dtype), variables)
        )
        t_dense, t_masked = paired_times(
            lambda: dense_fn(variables, x),  # noqa: B023 - called in this iteration
            lambda: dense_fn(masked, x),  # noqa: B023 - called in this iteration
            rounds=max(3, rounds // 2),
            calls=calls,
        )
        rows.append(
            {
                "model": name,
                "batch": batch,
                "variant": "90% unstructured (zeros, dense shapes)",
                "unpruned ms": t_dense,
                "pruned ms": t_masked,
                "speed-up": t_dense / t_masked,
            }
        )
    report.table("speed: pruned vs unpruned, jit-compiled", rows)
    report.check("speedup_structured50_b16_cnn224", rows[0]["speed-up"], 1.7, ">=")
    report.check("speedup_structured50_b256_mlp", rows[2]["speed-up"], 1.7, ">=")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="write the checks and tables as JSON")
    parser.add_argument("--steps", type=int, default=600, help="training steps of the float models")
    parser.add_argument("--finetune-steps", type=int, default=600, help="fine-tuning steps after structured pruning")
    parser.add_argument("--gradual-steps", type=int, default=1200, help="gradual-pruning fine-tuning steps")
    parser.add_argument("--rounds", type=int, default=7, help="alternating timing rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", choices=["accuracy", "speed"], action="append", default=[])
    args = parser.parse_args(argv)
    report = Report("pruning benchmark")
    if "accuracy" not in args.skip:
        accuracy_section(
            report,
            steps=args.steps,
            finetune_steps=args.finetune_steps,
            gradual_steps=args.gradual_steps,
            seed=args.seed,
        )
    if "speed" not in args.skip:
        speed_section(report, rounds=args.rounds)
    report.print()
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
