"""Quantization benchmark: size, accuracy and speed of quantized models against f32, in one run.

    python benchmarks/quant_bench.py --json results/quant.json

Prints tables and the acceptance checks of the quantization chapter, and
writes ``{"device", "checks": [{"name", "value", "target", "op", "passed"}], "tables"}``.
Accuracy drops are in points (percent), speed-ups are f32 time / quantized
time measured in alternating rounds in the same process. The MLP's W8A8
speed checks use 7-bit asymmetric activations (``mark_asymmetric(q, ".*",
bits=7)``, the activation range torch's ``quantize_dynamic`` uses on x86); the
symmetric ``dynamic`` rows are in the table beside them. ``--allocator``:
whether the process keeps freed host memory (default ``retain``, as the
serving commands do; ``default`` for glibc's policy). When PyTorch is
installed (``pip install torch==2.13.0``), the same MLP weights also run
through torch f32 and ``torch.ao.quantization.quantize_dynamic`` int8.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import Report, accuracy_pct, add_allocator_flag, apply_allocator, paired_times  # noqa: E402

from jaxopt_serve.data import load_digit_tokens, load_digits  # noqa: E402
from jaxopt_serve.models import CNNConfig, MLPConfig, TransformerConfig, init_variables, predict_fn  # noqa: E402
from jaxopt_serve.quant import (  # noqa: E402
    QuantRule,
    QuantSpec,
    grouped_rules,
    measure,
    quantize,
)
from jaxopt_serve.quant.calibrate import calibrate  # noqa: E402
from jaxopt_serve.quant.qat import qat_finetune, ternary_rules  # noqa: E402
from jaxopt_serve.quant.runtime import mark_asymmetric, quantized_predict_fn, serving_layout  # noqa: E402
from jaxopt_serve.train import train_classifier  # noqa: E402

KERNELS = r"params/(.*/)?kernel"
INT8 = [QuantRule(KERNELS, QuantSpec(qtype="int8", granularity="channel"))]
INT4_G32 = QuantSpec(qtype="int4", granularity="group", group_size=32)


def size_section(report: Report) -> None:
    variables = init_variables(MLPConfig(features=(4096, 4096), input_shape=(4096,)), 0)
    rows = []
    for name, rules in [
        ("int8 per-channel", INT8),
        ("int4 per-group g32", grouped_rules(variables, INT4_G32)),
        ("int4 per-group g128", [QuantRule(KERNELS, QuantSpec(qtype="int4", granularity="group", group_size=128))]),
        ("ternary per-channel", [QuantRule(KERNELS, QuantSpec(qtype="ternary"))]),
        ("binary per-channel", [QuantRule(KERNELS, QuantSpec(qtype="binary"))]),
    ]:
        result = quantize(variables, rules)
        rows.append(
            {
                "scheme": name,
                "f32 kernel bytes": result.float_bytes,
                "quantized bytes": result.quantized_bytes,
                "ratio": result.compression,
            }
        )
    report.table("size of the MLP 4096-4096 kernels (values + scales + zero points)", rows)
    report.check("size_ratio_int8", rows[0]["ratio"], 3.9, ">=")
    report.check("size_ratio_int4", rows[2]["ratio"], 7.5, ">=")  # g128; g32 is in the table


def accuracy_section(report: Report, *, steps: int, qat_steps: int, seed: int) -> None:
    digits = load_digits(seed=seed)
    rows = []
    for name, config in [("cnn", CNNConfig()), ("mlp", MLPConfig())]:
        artifact, _ = train_classifier(config, digits, steps=steps, seed=seed, progress=False)
        base = 100.0 * artifact.metadata["test_accuracy"]
        v = artifact.variables
        int8 = quantize(v, INT8).variables
        static = calibrate(config, int8, digits.x_train[:512], method="percentile")
        # per-channel where a group of 32 does not fit (conv_0)
        int4 = quantize(v, grouped_rules(v, INT4_G32)).variables
        ternary = quantize(v, ternary_rules()).variables
        results = {
            "f32": base,
            "int8 W8A8 dynamic": accuracy_pct(config, int8, digits, mode="dynamic"),
            "int8 W8A8 static (percentile)": accuracy_pct(config, static, digits, mode="static"),
            "int8 weight-only": accuracy_pct(config, int8, digits, mode="weight_only"),
            "int4 g32 weight-only": accuracy_pct(config, int4, digits, mode="weight_only"),
            "ternary PTQ": accuracy_pct(config, ternary, digits, mode="weight_only"),
        }
        if name == "cnn":
            qat, _ = qat_finetune(config, v, digits, ternary_rules(), steps=qat_steps, seed=seed, progress=False)
            results["ternary QAT"] = accuracy_pct(config, qat.variables, digits, mode="dynamic")
        for variant, acc in results.items():
            rows.append({"model": name, "variant": variant, "accuracy %": acc, "drop (points)": base - acc})
        report.check(f"acc_drop_int8_{name}", base - results["int8 W8A8 dynamic"], 0.5, "<=")
        report.check(f"acc_drop_int4_{name}", base - results["int4 g32 weight-only"], 2.0, "<=")
        if name == "cnn":
            report.check("acc_drop_ternary_qat_cnn", base - results["ternary QAT"], 3.0, "<=")
    report.table("digits test accuracy (359 images)", rows)

    tokens = load_digit_tokens(seed=seed)
    config = TransformerConfig(
        vocab_size=18, max_len=65, seq_len=65, hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128, num_classes=10
    )
    artifact, _ = train_classifier(config, tokens, steps=steps, learning_rate=1e-3, seed=seed, progress=False)
    q = quantize(artifact.variables, INT8).variables
    ref = np.asarray(jax.jit(predict_fn(config))(artifact.variables, tokens.x_test))
    rows = []
    for mode in ("dynamic", "weight_only"):
        out = np.asarray(jax.jit(quantized_predict_fn(config, mode=mode))(q, tokens.x_test))
        cos = float(np.mean(np.sum(out * ref, -1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)))
        agree = float(np.mean(out.argmax(-1) == ref.argmax(-1)))
        rows.append({"mode": mode, "mean logits cosine": cos, "top-1 agreement": agree})
    rows.insert(
        0,
        {
            "mode": "f32",
            "mean logits cosine": 1.0,
            "top-1 agreement": 1.0,
            "test accuracy": artifact.metadata["test_accuracy"],
        },
    )
    report.table("Transformer encoder on digit tokens, int8 vs f32", rows)
    report.check("encoder_int8_logit_cosine", rows[1]["mean logits cosine"], 0.99, ">=")


# The W8A8 configuration of torch's quantize_dynamic on x86 (7-bit activation range, asymmetric per row), which the
# AVX2 kernel multiplies without a sign fix-up; the "dynamic" rows keep symmetric 8-bit activations.
ASYM7 = "dynamic, 7-bit asym. activations"


def speed_section(report: Report, *, rounds: int, torch_peer: bool) -> None:
    rng = np.random.default_rng(0)
    config = MLPConfig(features=(4096, 4096), input_shape=(4096,))
    v = init_variables(config, 0)
    q = serving_layout(quantize(v, INT8).variables)
    q7 = mark_asymmetric(q, ".*", bits=7)
    f32 = jax.jit(predict_fn(config))
    modes = {m: jax.jit(quantized_predict_fn(config, mode=m)) for m in ("dynamic", "auto")}
    variants = {"dynamic": (modes["dynamic"], q), ASYM7: (modes["dynamic"], q7), "auto": (modes["auto"], q)}
    rows = []
    for batch in (1, 16, 256):
        x = jnp.asarray(rng.normal(size=(batch, 4096)), jnp.float32)
        for mode, (fn, qv) in variants.items():
            if mode == "auto" and batch != 1:
                continue
            t_f32, t_q = paired_times(
                lambda: f32(v, x),  # noqa: B023 - called in this iteration
                lambda: fn(qv, x),  # noqa: B023 - called in this iteration
                rounds=rounds,
            )
            rows.append(
                {
                    "model": "mlp 4096x2",
                    "batch": batch,
                    "mode": mode,
                    "f32 ms": t_f32,
                    "int8 ms": t_q,
                    "speed-up": t_f32 / t_q,
                }
            )
    cnn = CNNConfig(in_channels=3, example_size=224)
    cv = init_variables(cnn, 0, (224, 224, 3))
    cq = serving_layout(quantize(cv, INT8).variables)
    f32c = jax.jit(predict_fn(cnn))
    cmodes = {m: jax.jit(quantized_predict_fn(cnn, mode=m)) for m in ("dynamic", "auto")}
    for batch, mode in ((1, "auto"), (16, "dynamic"), (16, "auto")):
        x = jnp.asarray(rng.uniform(size=(batch, 224, 224, 3)), jnp.float32)
        t_f32, t_q = paired_times(
            lambda: f32c(cv, x),  # noqa: B023 - called in this iteration
            lambda: cmodes[mode](cq, x),  # noqa: B023 - called in this iteration
            rounds=max(3, rounds // 2),
            calls=2,
        )
        rows.append(
            {
                "model": "cnn 224x224x3",
                "batch": batch,
                "mode": mode,
                "f32 ms": t_f32,
                "int8 ms": t_q,
                "speed-up": t_f32 / t_q,
            }
        )
    report.table("speed: W8A8 (int8 x int8 -> int32) vs f32, jit-compiled, same weights", rows)
    report.table(
        "auto's measured choices (each layer alone, random inputs of its shapes; smaller layers keep the rule)",
        [
            {
                "layer": c.layer,
                "input": "x".join(map(str, c.shape)),
                "int8 ms": c.int8_ms,
                "float ms": c.float_ms,
                "runs": c.mode,
            }
            for c in measure.measured()
        ],
    )

    def speed(model, batch, mode):
        return next(
            r["speed-up"] for r in rows if r["model"].startswith(model) and r["batch"] == batch and r["mode"] == mode
        )

    report.check("speedup_w8a8_b256_mlp", speed("mlp", 256, ASYM7), 3.0, ">=")
    report.check("speedup_w8a8_b16_mlp", speed("mlp", 16, ASYM7), 2.0, ">=")
    report.check("speedup_auto_b1_mlp", speed("mlp", 1, "auto"), 1.0, ">=")
    report.check("speedup_w8a8_b16_cnn224", speed("cnn", 16, "dynamic"), 2.0, ">=")
    report.check("speedup_auto_b16_cnn224", speed("cnn", 16, "auto"), 1.0, ">=")
    report.check("speedup_auto_b1_cnn224", speed("cnn", 1, "auto"), 1.0, ">=")
    if torch_peer:
        torch_section(report, v, q, modes["dynamic"], rounds=rounds)


def torch_section(report: Report, variables, qvariables, jax_int8, *, rounds: int) -> None:
    try:
        import torch
    except ImportError:
        print("torch not installed: skipping the PyTorch peer (pip install torch==2.13.0)")
        return
    p = variables["params"]
    layers = []
    for name in ("dense_0", "dense_1", "classifier"):
        kernel = np.asarray(p[name]["kernel"])
        lin = torch.nn.Linear(kernel.shape[0], kernel.shape[1])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(kernel.T.copy()))
            lin.bias.copy_(torch.from_numpy(np.asarray(p[name]["bias"])))
        layers += [lin, torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1]).eval()
    qmodel = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    rows = []
    rng = np.random.default_rng(1)
    with torch.inference_mode():
        for batch in (1, 16, 256):
            xn = rng.normal(size=(batch, 4096)).astype(np.float32)
            xt, xj = torch.from_numpy(xn), jnp.asarray(xn)
            # The lambdas are timed right here, within this iteration: late binding is harmless.
            t_torch_f32, t_torch_int8 = paired_times(
                lambda: model(xt),  # noqa: B023
                lambda: qmodel(xt),  # noqa: B023
                rounds=rounds,
            )
            _, t_jax_int8 = paired_times(
                lambda: qmodel(xt),  # noqa: B023
                lambda: jax_int8(qvariables, xj),  # noqa: B023
                rounds=rounds,
            )
            rows.append(
                {
                    "batch": batch,
                    "torch f32 ms": t_torch_f32,
                    "torch int8 dynamic ms": t_torch_int8,
                    "jaxopt_serve W8A8 ms": t_jax_int8,
                    "jaxopt_serve / torch int8 time": t_jax_int8 / t_torch_int8,
                }
            )
    report.table(f"PyTorch {torch.__version__} peer on the same MLP weights", rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="write the checks and tables as JSON")
    parser.add_argument("--steps", type=int, default=600, help="training steps of the float models")
    parser.add_argument("--qat-steps", type=int, default=200, help="QAT fine-tuning steps")
    parser.add_argument("--rounds", type=int, default=7, help="alternating timing rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", choices=["size", "accuracy", "speed"], action="append", default=[])
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer even if installed")
    add_allocator_flag(parser)
    args = parser.parse_args(argv)
    report = Report("quantization benchmark")
    apply_allocator(args, report)
    if "size" not in args.skip:
        size_section(report)
    if "accuracy" not in args.skip:
        accuracy_section(report, steps=args.steps, qat_steps=args.qat_steps, seed=args.seed)
    if "speed" not in args.skip:
        speed_section(report, rounds=args.rounds, torch_peer=not args.no_torch)
    report.print()
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
