"""The structured-pruning zoo as ``Model`` s with random variables (untrained, built once per session)."""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from jaxopt_serve.model import Model

from . import zoo

ZOO = ("resnet", "vit", "gated", "dw", "flat")


def _images(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 8, 8, 1)).astype(np.float32)


def _random_init(net, *example, seed: int = 1, **kwargs) -> dict:
    """Random variables shaped like ``net.init``'s, without running it (no compile): weights scaled by
    1/sqrt(fan-in), BatchNorm statistics that are not (0, 1) so a wrong slice of them shows in the outputs."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), *example, **kwargs))

    def leaf(path, s):
        noise = rng.normal(size=s.shape).astype(s.dtype)
        name = path[-1].key
        if name == "var":
            return np.abs(noise) + 0.5
        if name in ("mean", "bias", "pos_embedding"):
            return 0.1 * noise
        if name == "scale":
            return 1.0 + 0.1 * noise
        return noise / np.sqrt(max(1, int(np.prod(s.shape[:-1]))))

    return jax.tree_util.tree_map_with_path(leaf, jax.tree.map(lambda s: s, dict(shapes)))


@functools.cache
def zoo_model(name: str) -> Model:
    if name == "resnet":
        net, x = zoo.ResNet(), _images()
        v = _random_init(net, x, train=False)
        return Model.linen(net, v, x, eval_kwargs={"train": False}, train_kwargs={"train": True})
    if name == "vit":
        net = zoo.ViT(dim=16, heads=4, mlp_dim=32)
        mask = np.ones((2, 16), bool)
        mask[1, 10:] = False
        x = {"pixels": _images(), "mask": mask}
        return Model.linen(net, _random_init(net, x), x)
    if name == "gated":
        x = np.random.default_rng(0).normal(size=(2, 16)).astype(np.float32)
        return Model.nnx(zoo.GatedMLP(rngs=nnx.Rngs(0)), x)
    if name == "dw":
        net, x = zoo.DepthwiseSeparable(), _images()
        v = _random_init(net, x)
        return Model.linen(net, v, x, eval_kwargs={"train": False}, train_kwargs={"train": True})
    if name == "flat":
        net, x = zoo.FlattenNet(), _images()
        return Model.linen(net, _random_init(net, x), x)
    raise KeyError(name)
