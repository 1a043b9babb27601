"""Pruning: unstructured and N:M masks, gradual schedules, structured surgery, sparse artifacts, regularizers."""

from jaxopt_serve.prune.masks import (
    PruneResult,
    PruneRule,
    UnusedPruneRuleWarning,
    apply_masks,
    classification_grad_fn,
    compute_masks,
    default_prune_rules,
    importance_scores,
    is_nm_sparse,
    magnitude_scores,
    nm_mask,
    prune,
    random_scores,
    tree_sparsity,
)
from jaxopt_serve.prune.schedule import (
    GradualPruningState,
    gradual_pruning,
    keep_masks,
    polynomial_sparsity,
)
from jaxopt_serve.prune.masks import calibration_batches, mean_gradients
from jaxopt_serve.prune.structured import (
    Group,
    Slice,
    StructuredResult,
    apply_plan,
    group_scores,
    mask_plan,
    model_groups,
    plan,
    register_coupling,
    structured_prune,
)
from jaxopt_serve.prune.regularize import (
    add_group_lasso,
    add_l1,
    add_l2,
    group_lasso_penalty,
    group_norms,
    l1_penalty,
    l2_penalty,
    regularized,
)
from jaxopt_serve.prune.sparse_io import decode_sparse, encode_sparse, sparse_artifact
from jaxopt_serve.prune.pipeline import DeepCompressResult, deep_compress, finetune
