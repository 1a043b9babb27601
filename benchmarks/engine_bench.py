"""Engine benchmark: jit vs eager, a bucketed request stream vs recompiling jit, cold vs warm compile cache, and
int8 kernels of more than two axes packed once vs inside every call.

    python benchmarks/engine_bench.py --json results/engine.json

All ratios are measured in one run on the same machine. The issue names the
checks but not their targets; the targets used here are this project's:
jit >= 2x eager apply, the bucketed stream >= 1.5x faster than a jit that
compiles every new batch size, zero compiles after warm-up, and a warm
persistent cache >= 1.5x faster to the first prediction than a cold one.
The layout section (needs the native kernels and the ``hf`` extra) runs the
bundled all-MiniLM-L6-v2 in int8 W8A8 at 16 tokens with its attention
projections (``DenseGeneral``, 3-D kernels) packed once for the native
kernels (``serving_layout(q, leading_contractions(...))``, what
``InferenceEngine`` does) against packed inside every call
(``serving_layout(q)`` alone, the engine's behaviour before), in alternating
rounds; checked: >= 1.2x at batch 1. The same for a CNN of seven 3x3
convolutions with Flax's HWIO kernels (a table, no check).
Writes ``{"device", "checks", "tables"}``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import Report, paired_times  # noqa: E402

from jaxopt_serve.engine import InferenceEngine  # noqa: E402
from jaxopt_serve.models import CNNConfig, init_variables, predict_fn  # noqa: E402
from jaxopt_serve.timing import CompileCounter  # noqa: E402


def jit_section(report: Report, *, rounds: int) -> None:
    config = CNNConfig()
    variables = init_variables(config, 0)
    module = config.build()
    x = np.random.default_rng(0).normal(size=(64, 8, 8, 1)).astype(np.float32)
    eager = lambda: module.apply(variables, x)  # noqa: E731  op by op, as written
    jitted_fn = jax.jit(predict_fn(config))
    jitted = lambda: jitted_fn(variables, x)  # noqa: E731
    t_eager, t_jit = paired_times(eager, jitted, rounds=rounds, calls=3)
    report.table(
        "reference CNN, batch 64: un-jitted apply vs jax.jit",
        [
            {"variant": "eager apply", "ms": t_eager},
            {"variant": "jax.jit", "ms": t_jit},
            {"variant": "speed-up", "ms": t_eager / t_jit},
        ],
    )
    report.check("speedup_jit_vs_eager_cnn", t_eager / t_jit, 2.0, ">=")


def stream_section(report: Report, *, requests: int, seed: int) -> None:
    config = CNNConfig()
    variables = init_variables(config, 0)
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 65, size=requests)
    pool = rng.normal(size=(64, 8, 8, 1)).astype(np.float32)

    with CompileCounter() as plain_compiles:
        start = time.perf_counter()
        plain = jax.jit(predict_fn(config))
        for n in sizes:
            np.asarray(plain(variables, pool[:n]))
        t_plain = time.perf_counter() - start
    with CompileCounter() as engine_compiles:
        start = time.perf_counter()
        engine = InferenceEngine(config, variables, max_batch=64)  # buckets compile on first use
        for n in sizes:
            engine(pool[:n])
        t_engine = time.perf_counter() - start
    with CompileCounter() as after:
        start = time.perf_counter()
        for n in rng.integers(1, 65, size=requests):
            engine(pool[:n])
        t_warm = time.perf_counter() - start
    report.table(
        f"{requests} requests, random batch sizes 1-64 (distinct: {len(set(sizes.tolist()))})",
        [
            {"path": "jax.jit, recompiles per new shape", "total s": t_plain, "compiles": plain_compiles.count},
            {
                "path": "bucketed engine (cold: compiles its buckets)",
                "total s": t_engine,
                "compiles": engine_compiles.count,
            },
            {"path": "bucketed engine, second stream (warm)", "total s": t_warm, "compiles": after.count},
        ],
    )
    report.check("speedup_bucketed_vs_recompiling_stream", t_plain / t_engine, 1.5, ">=")
    report.check("compiles_after_warmup", after.count, 0, "<=")


FIRST_PREDICTION = textwrap.dedent("""
    import sys, time
    import numpy as np
    from jaxopt_serve.engine import InferenceEngine, enable_compilation_cache
    from jaxopt_serve.models import TransformerConfig, init_variables
    enable_compilation_cache(sys.argv[1])
    config = TransformerConfig(vocab_size=18, max_len=65, seq_len=65, hidden_size=64, num_layers=4, num_heads=4,
                               mlp_dim=128, num_classes=10)
    variables = init_variables(config, 0)
    x = np.zeros((3, 65), np.int32)
    start = time.perf_counter()
    engine = InferenceEngine(config, variables, max_batch=64).warmup()  # a server warms every bucket first
    engine(x)
    print(time.perf_counter() - start)
""")


def cache_section(report: Report) -> None:
    cache = tempfile.mkdtemp(prefix="jaxopt_serve_cache_")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    times = []
    for _ in range(2):
        run = subprocess.run(
            [sys.executable, "-c", FIRST_PREDICTION, cache], capture_output=True, text=True, timeout=600, env=env
        )
        if run.returncode:
            raise RuntimeError(run.stderr)
        times.append(float(run.stdout.split()[-1]))
    report.table(
        "time to first prediction, fresh process, 4-layer encoder, 7 buckets (1-64)",
        [
            {"cache": "cold (empty directory)", "s": times[0]},
            {"cache": "warm (same directory)", "s": times[1]},
            {"cache": "speed-up", "s": times[0] / times[1]},
        ],
    )
    report.check("speedup_warm_cache_first_prediction", times[0] / times[1], 1.5, ">=")


def layout_section(report: Report, *, rounds: int) -> None:
    import importlib.util

    from jaxopt_serve import native

    if not native.available() or importlib.util.find_spec("tokenizers") is None:
        print("layout section skipped: needs the native kernels and the hf extra (tokenizers)")
        return
    from jaxopt_serve.demo import minilm_int8
    from jaxopt_serve.hf import SentenceEncoder, bundled_minilm_dir
    from jaxopt_serve.quant import leading_contractions, quantized_predict_fn, serving_layout

    encoder = SentenceEncoder(bundled_minilm_dir())
    q = minilm_int8(encoder.variables)
    run = jax.jit(quantized_predict_fn(encoder.model, mode="dynamic"))
    rows = []
    for batch in (1, 32):
        ids, mask = encoder.tokenize(["A man is eating food at a small table."] * batch, multiple=16)
        x = {"input_ids": ids, "attention_mask": mask}
        per_call = jax.device_put(serving_layout(q))
        once = jax.device_put(serving_layout(q, leading_contractions(encoder.model, q, x)))
        np.testing.assert_array_equal(run(per_call, x), run(once, x))  # the same numbers, only the layout moves
        t_call, t_once = paired_times(
            lambda a=per_call, x=x: run(a, x), lambda b=once, x=x: run(b, x), rounds=rounds, calls=20
        )
        rows.append(
            {"batch": batch, "packed per call ms": t_call, "packed once ms": t_once, "speed-up": t_call / t_once}
        )
    report.table(
        f"MiniLM int8 W8A8, {ids.shape[1]} tokens: 3-D attention kernels packed inside every call vs once",
        rows,
    )
    report.check("speedup_packed_once_vs_per_call_minilm_b1", rows[0]["speed-up"], 1.2, ">=")
    report.table(
        "a CNN of seven 3x3 convolutions (64 channels, Flax HWIO kernels), int8 W8A8: packed inside every call vs once",
        [_conv_layout_row(batch, size, rounds) for batch, size in ((1, 32), (8, 32))],
    )


def _conv_layout_row(batch: int, size: int, rounds: int) -> dict:
    import flax.linen as nn

    from jaxopt_serve.model import Model
    from jaxopt_serve.quant import leading_contractions, quantize, quantized_predict_fn, serving_layout

    class Convs(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(7):
                x = nn.relu(nn.Conv(64, (3, 3))(x))
            return x.mean((1, 2))

    x = np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)
    net = Convs()
    model = Model.linen(net, net.init(jax.random.PRNGKey(0), x), x)
    q = quantize(model.variables).variables
    run = jax.jit(quantized_predict_fn(model, mode="dynamic"))
    per_call = jax.device_put(serving_layout(q))
    once = jax.device_put(serving_layout(q, leading_contractions(model, q, x)))
    np.testing.assert_array_equal(run(per_call, x), run(once, x))
    t_call, t_once = paired_times(lambda: run(per_call, x), lambda: run(once, x), rounds=rounds, calls=20)
    return {
        "batch": batch,
        "image": f"{size}x{size}x3",
        "packed per call ms": t_call,
        "packed once ms": t_once,
        "speed-up": t_call / t_once,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="write the checks and tables as JSON")
    parser.add_argument("--requests", type=int, default=200, help="requests in the stream (default: 200)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating timing rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", choices=["jit", "stream", "cache", "layout"], action="append", default=[])
    args = parser.parse_args(argv)
    report = Report("engine benchmark")
    if "jit" not in args.skip:
        jit_section(report, rounds=args.rounds)
    if "stream" not in args.skip:
        stream_section(report, requests=args.requests, seed=args.seed)
    if "cache" not in args.skip:
        cache_section(report)
    if "layout" not in args.skip:
        layout_section(report, rounds=args.rounds)
    report.print()
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
