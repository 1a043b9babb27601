"""Automatic structured pruning (``prune.prune_model``): coupling from the traced program, smaller models out.

    python benchmarks/structured_bench.py --json results/structured.json

Prints tables and the acceptance checks and writes ``{"device", "checks",
"tables"}`` (``common.Report``). No model here has hand-written coupling:

* ``auto_models_shrunk``: the structured-pruning zoo (``tests/prune/zoo.py``:
  the foreign ResNet and ViT, an NNX gated MLP, a depthwise-separable conv net,
  a conv net flattened into a Dense) pruned 50%; a model counts when it got
  smaller and its outputs equal the masked original's (``mask_plan``).
* ``auto_groups_match_manual``: 1.0 when the groups found for the four
  reference models (MLP, CNN, NNX MLP, Transformer encoder) contain exactly the
  hand-written ones.
* speed-ups: unpruned time / pruned time, both f32 and ``jax.jit``-compiled,
  measured in alternating rounds in this process (``common.paired_times``),
  batch 16, each zoo class at a size where compute, not dispatch, dominates:
  ``speedup_structured50_resnet_b16`` (widths (64, 128), 32x32x3),
  ``speedup_structured50_vit_b16`` (dim 256, MLP 1024, 2 blocks, 64 patches),
  ``speedup_structured50_gated_b16`` (din 512, hidden 2048),
  ``speedup_structured50_dw_b16`` (widths (64, 128), 32x32x3) and
  ``speedup_structured50_flat_b16`` (``scale=8``: convs (64, 128), Dense 192,
  32x32x3).
* ``acc_drop_structured50_resnet_finetuned``: the foreign ResNet trained on
  the bundled digits, pruned 50% (L1), fine-tuned briefly; points of test accuracy.
* MiniLM (all-MiniLM-L6-v2, bundled): half the heads and FFN units of every
  layer found automatically; the speed-up at batch 32 x 128 tokens, and the
  mean cosine to the full model on the 240 held-out sentences after
  distillation on ``hf.text_corpus`` (``--distill-steps``; 0 skips it): the
  student is ``prune_model``'s smaller model itself, trained by
  ``distill.distill_models`` (no hand-written coupling or config rewrite).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np
import optax
from flax import nnx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "hf"))
from common import Report, paired_times  # noqa: E402

from foreign import conftest as foreign  # noqa: E402
from jaxopt_serve.data import load_digits  # noqa: E402
from jaxopt_serve.distill import distill_models  # noqa: E402
from jaxopt_serve.distill.losses import hidden_cosine  # noqa: E402
from jaxopt_serve.hf.compress import student_optimizer  # noqa: E402
from jaxopt_serve.model import Model  # noqa: E402
from jaxopt_serve.models import CNNConfig, MLPConfig, NNXMLPConfig, TransformerConfig, init_variables  # noqa: E402
from jaxopt_serve.prune import analyze, model_groups, prune_model  # noqa: E402
from prune import zoo  # noqa: E402
from prune.zoo_cases import ZOO, zoo_model  # noqa: E402


def _count(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def zoo_section(report: Report) -> None:
    rows, shrunk = [], 0
    for name in ZOO:
        model = zoo_model(name)
        result = prune_model(model, 0.5)
        full = jax.jit(model.apply_fn)(result.masked_variables(), *model.example)
        small = jax.jit(result.model.apply_fn)(result.variables, *model.example)
        diff = max(
            float(np.abs(np.asarray(a) - np.asarray(b)).max())
            for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(small))
        )
        before, after = _count(model.variables["params"]), _count(result.variables["params"])
        ok = after < before and diff <= 1e-4
        shrunk += ok
        rows.append(
            {
                "model": name,
                "groups": len(result.groups),
                "left whole": len([r for r in result.analysis.refused if r.kind not in ("input", "output")]),
                "params": f"{before} -> {after}",
                "smaller model": result.how,
                "max |small - masked|": diff,
                "ok": ok,
            }
        )
    report.table("zoo: 50% of every group, no hand-written coupling", rows)
    report.check("auto_models_shrunk", shrunk, 5, ">=")


def reference_section(report: Report) -> None:
    configs = {
        "mlp": MLPConfig(features=(24, 16), num_classes=5),
        "nnx_mlp": NNXMLPConfig(features=(24, 16), num_classes=5),
        "cnn": CNNConfig(channels=(8, 12), convs_per_stage=2, hidden=10),
        "transformer": TransformerConfig(
            vocab_size=30, max_len=16, hidden_size=16, num_heads=4, mlp_dim=24, num_layers=2
        ),
    }
    rows, matched = [], 0
    for name, config in configs.items():
        model = Model.from_config(config, init_variables(config, 0), batch_size=2)
        found = {frozenset(g.slices) for g in analyze(model).groups}
        manual = {frozenset(g.slices) for g in model_groups(config)}
        ok = manual <= found
        matched += ok
        rows.append(
            {
                "model": name,
                "hand-written groups": len(manual),
                "found": len(found),
                "all hand-written found": ok,
                "extra": len(found - manual),
            }
        )
    report.table("reference models: automatic vs hand-written groups", rows)
    report.check("auto_groups_match_manual", matched / len(configs), 1.0, ">=")


def _speed(model: Model, inputs, result, rounds: int, calls: int, options=None) -> tuple[float, float]:
    variables, small_vars = jax.device_put(model.variables), jax.device_put(result.variables)
    dense = jax.jit(model.apply_fn).lower(variables, *inputs).compile(options)
    small = jax.jit(result.model.apply_fn).lower(small_vars, *inputs).compile(options)
    return paired_times(
        lambda: dense(variables, *inputs), lambda: small(small_vars, *inputs), rounds=rounds, calls=calls
    )


def _timed_row(rows: list, label: str, model: Model, inputs: tuple, result, rounds: int, options=None) -> float:
    """Time ``result`` 's pruned model against ``model`` at batch 16 (both compiled with XLA ``options``), add the
    row, return the speed-up."""
    t_full, t_small = _speed(model, inputs, result, rounds, 3, options)
    rows.append(
        {
            "model": label,
            "batch": 16,
            "smaller model": result.how,
            "unpruned ms": t_full,
            "pruned ms": t_small,
            "speed-up": t_full / t_small,
        }
    )
    return t_full / t_small


def _speed_row(
    report: Report, rows: list, label: str, model: Model, inputs: tuple, rounds: int, check: str, target: float
):
    """Prune ``model`` 50%, time it against the unpruned one at batch 16, add its row and its check; the result."""
    result = prune_model(model, 0.5)
    report.check(check, _timed_row(rows, label, model, inputs, result, rounds), target, ">=")
    return result


# sizes and targets of the gated, depthwise-separable and flattened rows; measured on the 2-core AMD EPYC under
# load: gated 1.65-2.61x, dw 1.85-2.30x, flat 3.28-4.71x (docs/guides/pruning.md)
GATED_DIN, GATED_HIDDEN, GATED_MIN = 512, 2048, 1.3
DW_WIDTHS, DW_MIN = (64, 128), 1.5
FLAT_SCALE, FLAT_MIN = 8, 2.0


def speed_section(report: Report, rounds: int) -> None:
    rng = np.random.default_rng(0)
    rows = []
    images = rng.normal(size=(16, 32, 32, 3)).astype(np.float32)
    # the zoo's classes, at widths and image sizes where compute (not dispatch) dominates
    resnet = zoo.ResNet(widths=(64, 128))
    variables = jax.jit(lambda x: resnet.init(jax.random.key(0), x, train=False))(images[:2])
    model = Model.linen(resnet, variables, images, eval_kwargs={"train": False}, train_kwargs={"train": True})
    pruned = _speed_row(
        report,
        rows,
        "ResNet widths (64, 128), 32x32x3",
        model,
        (images,),
        rounds,
        "speedup_structured50_resnet_b16",
        1.5,
    )
    if jax.default_backend() == "cpu":  # no check: XLA:CPU without YNNPACK's convolution graphs (both models)
        label = "the same, compiler_options xla_cpu_experimental_ynn_fusion_type=''"
        _timed_row(rows, label, model, (images,), pruned, rounds, {"xla_cpu_experimental_ynn_fusion_type": ""})

    vit = zoo.ViT(dim=256, heads=8, mlp_dim=1024, depth=2)
    inputs = {"pixels": rng.normal(size=(16, 16, 16, 1)).astype(np.float32), "mask": np.ones((16, 64), bool)}
    variables = jax.jit(lambda x: vit.init(jax.random.key(0), x))(inputs)
    _speed_row(
        report,
        rows,
        "ViT dim 256, 8 heads, MLP 1024, 2 blocks, 64 patches",
        Model.linen(vit, variables, inputs),
        (inputs,),
        rounds,
        "speedup_structured50_vit_b16",
        1.5,
    )

    # The gated MLP's residual width stays whole (RMSNorm reduces over it): the hidden halves. The flattened net's
    # literal widths times its scale: no field holds a size, so its pruned model is the program re-run, as at scale 1.
    gated = zoo.GatedMLP(din=GATED_DIN, hidden=GATED_HIDDEN, dout=10, rngs=nnx.Rngs(0))
    x = rng.normal(size=(16, GATED_DIN)).astype(np.float32)
    label = f"NNX gated MLP din {GATED_DIN}, hidden {GATED_HIDDEN} (up {GATED_DIN}x{2 * GATED_HIDDEN})"
    _speed_row(report, rows, label, Model.nnx(gated, x), (x,), rounds, "speedup_structured50_gated_b16", GATED_MIN)

    dw = zoo.DepthwiseSeparable(widths=DW_WIDTHS)
    variables = jax.jit(lambda x: dw.init(jax.random.key(0), x, train=False))(images[:2])
    model = Model.linen(dw, variables, images, eval_kwargs={"train": False}, train_kwargs={"train": True})
    _speed_row(
        report,
        rows,
        f"depthwise-separable widths {DW_WIDTHS}, 32x32x3",
        model,
        (images,),
        rounds,
        "speedup_structured50_dw_b16",
        DW_MIN,
    )

    flat = zoo.FlattenNet(scale=FLAT_SCALE)
    variables = jax.jit(lambda x: flat.init(jax.random.key(0), x))(images[:2])
    widths = (8 * FLAT_SCALE, 16 * FLAT_SCALE, 24 * FLAT_SCALE)
    _speed_row(
        report,
        rows,
        f"convs {widths[:2]} flattened into Dense {widths[2]}, 32x32x3",
        Model.linen(flat, variables, images),
        (images,),
        rounds,
        "speedup_structured50_flat_b16",
        FLAT_MIN,
    )
    report.table("speed: 50% of every group, f32, jit vs jit", rows)


def finetune_section(report: Report, *, steps: int, finetune_steps: int) -> None:
    digits = load_digits()
    x_train, x_test = digits.x_train, digits.x_test
    model, logits_of = foreign.build("resnet", x_train[:2])
    variables, _ = foreign.train(model, x_train, digits.y_train, logits_of, steps=steps)
    model = model.with_variables(variables)
    base = 100 * foreign.evaluate(model, variables, x_test, digits.y_test, logits_of)
    result = prune_model(model, 0.5)
    one_shot = 100 * foreign.evaluate(result.model, result.variables, x_test, digits.y_test, logits_of)
    # Adam with a cosine decay from 2e-3 to 0 over the fine-tuning steps (a constant rate leaves the last
    # steps' noise in the weights).
    tuned, _ = foreign.train(
        result.model,
        x_train,
        digits.y_train,
        logits_of,
        steps=finetune_steps,
        learning_rate=optax.cosine_decay_schedule(2e-3, finetune_steps),
        seed=1,
    )
    after = 100 * foreign.evaluate(result.model, tuned, x_test, digits.y_test, logits_of)
    report.table(
        "foreign ResNet on the digits, 50% of every group (L1)",
        [
            {"variant": "trained", "widths": str(model_widths(model)), "accuracy %": base},
            {
                "variant": "pruned, no fine-tuning",
                "widths": str(result.module.widths if result.module else "-"),
                "accuracy %": one_shot,
            },
            {"variant": f"pruned, {finetune_steps} fine-tuning steps", "widths": "", "accuracy %": after},
        ],
    )
    report.check("acc_drop_structured50_resnet_finetuned", base - after, 1.5, "<=")


def model_widths(model: Model):
    return tuple(model.variables["params"][k]["conv2"]["kernel"].shape[-1] for k in ("block1", "block2"))


def _corpus_batches(encoder, sentences, *, batch_size: int, max_tokens: int) -> list[dict]:
    """The corpus as shuffled batches of ``{"input_ids", "attention_mask"}``, truncated to ``max_tokens``."""
    ids, mask = encoder.tokenize(list(sentences))
    ids, mask = ids[:, :max_tokens], mask[:, :max_tokens]
    order = np.random.default_rng(0).permutation(len(ids))
    return [
        {"input_ids": ids[order[i : i + batch_size]], "attention_mask": mask[order[i : i + batch_size]]}
        for i in range(0, len(ids) - batch_size + 1, batch_size)
    ]


def _embed(model: Model, variables, encoder, sentences) -> np.ndarray:
    """``model``'s embeddings of ``sentences`` (tokenized by ``encoder``), in batches of 32."""
    ids, mask = encoder.tokenize(list(sentences))
    run = jax.jit(model.apply_fn)
    return np.concatenate(
        [
            np.asarray(run(variables, {"input_ids": ids[i : i + 32], "attention_mask": mask[i : i + 32]}))
            for i in range(0, len(ids), 32)
        ]
    )


def minilm_section(report: Report, *, rounds: int, distill_steps: int, learning_rate: float) -> None:
    import dataclasses

    from sentences import minilm_sentences

    from jaxopt_serve.hf import (
        SentenceEncoder,
        bundled_minilm_dir,
        embedding_agreement,
        text_corpus,
    )
    from jaxopt_serve.hf.sentence import example_inputs

    teacher = SentenceEncoder(bundled_minilm_dir())
    inputs = example_inputs(32, 128)
    inputs["input_ids"] = np.random.default_rng(0).integers(1000, 20000, size=(32, 128)).astype(np.int32)
    model = dataclasses.replace(teacher.model, example=(inputs,))
    start = time.perf_counter()
    result = prune_model(model, {r".*/attention": 0.5, r".*/intermediate": 0.5})
    seconds = time.perf_counter() - start
    t_full, t_small = _speed(model, (inputs,), result, rounds, 1)
    pruned = {k: v for k, v in result.sizes.items() if v[0] != v[1]}
    report.table(
        "all-MiniLM-L6-v2, half the heads and FFN units (found automatically), batch 32 x 128",
        [
            {
                "groups pruned": len(pruned),
                "heads per layer": str(pruned["layer_0/attention"]),
                "ffn per layer": str(pruned["layer_0/intermediate"]),
                "smaller model": result.how,
                "analysis + pruning s": seconds,
                "f32 ms": t_full,
                "pruned ms": t_small,
                "speed-up": t_full / t_small,
            }
        ],
    )
    report.check("minilm_heads_ffn50_speedup_b32", t_full / t_small, 1.5, ">=")
    if distill_steps <= 0:
        return
    # the automatically pruned model itself (result.model, whatever result.how is) is the student
    sentences = minilm_sentences()
    base = teacher.embed(sentences)
    before = embedding_agreement(base, _embed(result.model, result.variables, teacher, sentences))
    start = time.perf_counter()
    fitted = distill_models(
        teacher.model,
        result.model,
        _corpus_batches(teacher, text_corpus(4000), batch_size=32, max_tokens=64),
        steps=distill_steps,
        optimizer=student_optimizer(result.variables["params"], learning_rate, distill_steps),
        loss=lambda student, target, batch: hidden_cosine(student, target),
        labeled=False,
        log_every=50,
    )
    seconds = time.perf_counter() - start
    after = embedding_agreement(base, _embed(result.model, fitted.variables, teacher, sentences))
    report.table(
        "MiniLM half heads + FFN, distilled from the full model",
        [
            {
                "student": f"prune_model's smaller model ({result.how})",
                "steps": distill_steps,
                "learning rate": learning_rate,
                "cosine before": before["mean_cosine"],
                "cosine after": after["mean_cosine"],
                "top-1 after": after["top1_agreement"],
                "train s": seconds,
            }
        ],
    )
    report.check("minilm_heads_ffn50_distilled_cosine", after["mean_cosine"], 0.778, ">=")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="write the checks and tables as JSON")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    parser.add_argument("--train-steps", type=int, default=300, help="training steps of the foreign ResNet")
    parser.add_argument("--finetune-steps", type=int, default=300, help="fine-tuning steps after pruning")
    parser.add_argument("--distill-steps", type=int, default=300, help="MiniLM distillation steps (0: skip)")
    parser.add_argument("--learning-rate", type=float, default=5e-4, help="MiniLM distillation learning rate")
    parser.add_argument(
        "--skip", choices=["zoo", "reference", "speed", "finetune", "minilm"], action="append", default=[]
    )
    args = parser.parse_args(argv)
    report = Report("automatic structured pruning")
    if "zoo" not in args.skip:
        zoo_section(report)
    if "reference" not in args.skip:
        reference_section(report)
    if "speed" not in args.skip:
        speed_section(report, args.rounds)
    if "finetune" not in args.skip:
        finetune_section(report, steps=args.train_steps, finetune_steps=args.finetune_steps)
    if "minilm" not in args.skip:
        minilm_section(report, rounds=args.rounds, distill_steps=args.distill_steps, learning_rate=args.learning_rate)
    report.print()
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
