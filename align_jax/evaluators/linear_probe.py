"""Linear probe: a classifier fitted on frozen image features of a labelled train split and
scored on its test split (ALIGN's transfer to classification with a frozen tower; few-shot as
big_vision's linear few-shot evaluation).

The features are computed sharded over the mesh, then the classifier is fitted on device in
closed form: ridge regression onto one-hot targets, features standardised with the train
statistics and the bias left unregularised, `W = (Z^T Z + l2 N I)^-1 Z^T Y` for every `l2` of a
grid at once from one eigendecomposition (of `Z^T Z`, or of `Z Z^T` when there are fewer examples
than features, as big_vision's `fewshot_lsr`). `l2` is chosen by top-1 on a held-out slice of the
train split (`validation_fraction`, drawn with a fixed seed; ties go to the stronger
regularisation); the classifier is then refitted on the whole train split and scored on the test
split. Few-shot: k examples of each class drawn with the fixed seed from the train split less the
held-out slice, `l2` chosen on that same slice.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from align_jax.evaluators.lockstep import labelled_image_pass
from align_jax.evaluators.zeroshot import classification_metrics
from align_jax.input import pipeline
from align_jax.sharding import check_batch_size

FEATURES = ("embedding", "pooled")  # the unit-norm joint embedding, or the pooled tower before projection
DEFAULT_L2_REGS = tuple(float(10.0**e) for e in range(-6, 3))  # per example: the grid's spacing is a decade
# A feature whose spread is below this fraction of the largest feature's is constant up to
# round-off: left unscaled rather than blown up. Relative, because a randomly initialised tower's
# activations can shrink to ~1e-11 and still carry signal.
_CONSTANT_SPREAD = 1e-6
_HIGHEST = jax.lax.Precision.HIGHEST  # bf16 passes on an accelerator would blur the solve


@flax.struct.dataclass
class RidgeClassifier:
    """Linear classifiers for R regularisation strengths on standardised features:
    `logits = (x - mean) / scale @ weights[r] + bias[r]`."""

    mean: jax.Array  # [D]
    scale: jax.Array  # [D]
    weights: jax.Array  # [R, D, C]
    bias: jax.Array  # [R, C]

    def logits(self, features: jax.Array) -> jax.Array:
        """`[N, D]` features -> `[R, N, C]` logits, one slice per regularisation strength."""
        z = (features - self.mean) / self.scale
        return jnp.einsum("nd,rdc->rnc", z, self.weights, precision=_HIGHEST) + self.bias[:, None, :]


@functools.partial(jax.jit, static_argnames="num_classes")
def fit_ridge(features: jax.Array, labels: jax.Array, num_classes: int, l2_regs: jax.Array) -> RidgeClassifier:
    """Ridge regression of one-hot `labels` `[N]` on `features` `[N, D]` for each `l2_regs` `[R]`
    (per example: the penalty is `l2 * N * |W|^2`), in closed form on the device."""
    features = jnp.asarray(features, jnp.float32)
    l2_regs = jnp.asarray(l2_regs, jnp.float32)
    n, d = features.shape
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale = jnp.where(scale > _CONSTANT_SPREAD * scale.max(), scale, 1.0)
    z = (features - mean) / scale
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    bias = targets.mean(axis=0)  # with centred features, the unregularised intercept
    centred = targets - bias
    if n >= d:  # primal: (Z^T Z + l2 N I)^-1 Z^T Y with Z^T Z = Q diag(e) Q^T
        eigs, q = jnp.linalg.eigh(jnp.matmul(z.T, z, precision=_HIGHEST))
        left, right = q, jnp.matmul(q.T, jnp.matmul(z.T, centred, precision=_HIGHEST), precision=_HIGHEST)
    else:  # dual: Z^T (Z Z^T + l2 N I)^-1 Y, the same solution from an N x N problem
        eigs, q = jnp.linalg.eigh(jnp.matmul(z, z.T, precision=_HIGHEST))
        left, right = jnp.matmul(z.T, q, precision=_HIGHEST), jnp.matmul(q.T, centred, precision=_HIGHEST)
    # Round-off can leave eigenvalues of a rank-deficient Gram matrix slightly negative.
    inverse = 1.0 / (jnp.maximum(eigs, 0.0)[None, :] + l2_regs[:, None] * n)  # [R, K]
    weights = jnp.einsum("dk,rk,kc->rdc", left, inverse, right, precision=_HIGHEST)
    return RidgeClassifier(mean, scale, weights, jnp.broadcast_to(bias, (len(l2_regs), num_classes)))


def few_shot_indices(labels: np.ndarray, shots: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of `shots` examples of every class present in `labels` (all of a class's
    examples when it has fewer), drawn without replacement by a generator seeded with
    `(seed, shots)`: the same seed gives the same examples."""
    labels = np.asarray(labels)
    if not isinstance(shots, (int, np.integer)) or shots < 1:
        raise ValueError(f"shots must be a positive integer, got {shots!r}")
    rng = np.random.default_rng([seed, shots])
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        chosen.append(rng.choice(members, size=min(shots, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))


def _top1_per_l2(classifier: RidgeClassifier, features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    logits = np.asarray(classifier.logits(jnp.asarray(features, jnp.float32)))
    return np.array([classification_metrics(slice_, labels, ks=(1,))["top1"] for slice_ in logits])


def _best_l2(accuracies: np.ndarray) -> int:
    """The index of the best accuracy; among equals the strongest regularisation (the last)."""
    return len(accuracies) - 1 - int(np.argmax(accuracies[::-1]))


def linear_probe_metrics(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    l2_regs: Sequence[float] = DEFAULT_L2_REGS,
    shots: Sequence[int] = (),
    validation_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, float]:
    """The probe's protocol (see the module doc) on given features: `top1` and
    `mean_per_class_recall` on the test split, the chosen `l2_reg`, and `{k}shot_top1` for each k
    of `shots`. With one `l2_regs` value nothing is held out."""
    train_features, test_features = np.asarray(train_features, np.float32), np.asarray(test_features, np.float32)
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    if train_features.ndim != 2 or test_features.shape[1:] != train_features.shape[1:]:
        raise ValueError(f"expected features [N, D] and [M, D], got {train_features.shape} and {test_features.shape}")
    if train_labels.shape != train_features.shape[:1] or test_labels.shape != test_features.shape[:1]:
        raise ValueError("expected one label per feature row")
    for name, labels in (("train", train_labels), ("test", test_labels)):
        if len(labels) == 0 or labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"{name} labels must be classes in [0, {num_classes}), got {np.unique(labels)[:10]}")
    l2_regs = np.asarray(l2_regs, np.float32)
    if l2_regs.ndim != 1 or not len(l2_regs) or (l2_regs <= 0).any():
        raise ValueError(f"l2_regs must be positive numbers, got {l2_regs}")
    if not 0 < validation_fraction < 1 and len(l2_regs) > 1:
        raise ValueError(f"validation_fraction must lie in (0, 1) to choose among l2_regs, got {validation_fraction}")

    num_validation = int(round(validation_fraction * len(train_labels))) if len(l2_regs) > 1 else 0
    if len(l2_regs) > 1 and not 0 < num_validation < len(train_labels):
        raise ValueError(f"{len(train_labels)} train examples leave no validation slice at {validation_fraction}")
    order = np.random.default_rng(seed).permutation(len(train_labels))
    validation, fit = order[:num_validation], order[num_validation:]

    def choose(subset: np.ndarray) -> tuple[RidgeClassifier, int]:
        """Fitted on `subset` for every l2; the index chosen on the validation slice."""
        classifier = fit_ridge(train_features[subset], train_labels[subset], num_classes, l2_regs)
        if not num_validation:
            return classifier, 0
        return classifier, _best_l2(_top1_per_l2(classifier, train_features[validation], train_labels[validation]))

    _, best = choose(fit)
    final = fit_ridge(train_features, train_labels, num_classes, l2_regs[best : best + 1])
    test_logits = np.asarray(final.logits(jnp.asarray(test_features)))[0]
    metrics = classification_metrics(test_logits, test_labels, ks=(1,))
    metrics["l2_reg"] = float(l2_regs[best])
    for k in shots:
        subset = fit[few_shot_indices(train_labels[fit], k, seed)]
        classifier, index = choose(subset)
        metrics[f"{k}shot_top1"] = float(_top1_per_l2(classifier, test_features, test_labels)[index])
    return metrics


@functools.partial(jax.jit, static_argnums=(0, 1))
def _image_features(model, kind: str, variables: dict, images: jax.Array) -> jax.Array:
    return model.apply(variables, images, method="encode_image" if kind == "embedding" else "image_features")


class LinearProbeEvaluator:
    """Top-1 of a linear classifier fitted on frozen image features (see the module doc).

    `train_spec` and `test_spec` name labelled image sets (integer `label_field`); `features` is
    the dual encoder's unit-norm `embedding` or the `pooled` image tower before the projection
    (the only choice for an image classifier). Both sets are embedded on every `run`, in padded
    batches of one shape sharded over the mesh, then the fit runs on the device.
    """

    def __init__(
        self,
        model,
        mesh: jax.sharding.Mesh,
        *,
        train_spec: str,
        test_spec: str,
        data_config: ml_collections.ConfigDict,
        image_size: int,
        batch_size: int,
        label_field: str = "label",
        num_classes: int = 0,
        features: str = "embedding",
        shots: Sequence[int] = (1, 5, 10),
        l2_regs: Sequence[float] = DEFAULT_L2_REGS,
        validation_fraction: float = 0.2,
        seed: int = 0,
        max_train_examples: int = 0,
        max_examples: int = 0,
        prefix: str = "linear_probe",
    ):
        check_batch_size(batch_size, mesh)
        if batch_size % jax.process_count():
            raise ValueError(f"batch_size {batch_size} is not divisible by the {jax.process_count()} processes")
        if features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
        if features == "embedding" and not hasattr(model, "encode_image"):
            raise ValueError(f"features='embedding' needs a dual encoder; {type(model).__name__} has 'pooled' only")
        self.model = model
        self.mesh = mesh
        self.label_field = label_field
        self.num_classes = num_classes
        self.features = features
        self.shots = tuple(shots)
        self.l2_regs = tuple(l2_regs)
        self.validation_fraction = validation_fraction
        self.seed = seed
        self.limits = dict(train=max_train_examples, test=max_examples)
        self.prefix = prefix
        self.local_batch_size = batch_size // jax.process_count()
        images_only = data_config.copy_and_resolve_references()
        images_only.captions = {}
        self.datasets = {
            split: pipeline.make_dataset(
                spec,
                images_only,
                image_size=image_size,
                max_text_length=0,
                batch_size=self.local_batch_size,
                train=False,
                label_field=label_field,
            )
            for split, spec in (("train", train_spec), ("test", test_spec))
        }

    def embed(self, variables: dict) -> dict[str, np.ndarray | int]:
        """`train_features`, `train_labels`, `test_features`, `test_labels` (on every host) and
        `skipped`, the examples the input filters dropped."""
        out = dict(skipped=0)
        for split, dataset in self.datasets.items():
            features, labels, skipped = labelled_image_pass(
                dataset,
                self.mesh,
                self.local_batch_size,
                functools.partial(_image_features, self.model, self.features, variables),
                self.limits[split],
            )
            if labels.min() < 0:
                raise ValueError(f"{int((labels < 0).sum())} {split} images have no {self.label_field!r} field")
            out.update({f"{split}_features": features, f"{split}_labels": labels})
            out["skipped"] += skipped
        return out

    def run(self, variables: dict) -> dict[str, float]:
        """`{prefix}/top1`, `mean_per_class_recall`, `l2_reg`, `{k}shot_top1` per k of `shots`,
        `num_train`, `num_test`, `num_classes` and `skipped`."""
        e = self.embed(variables)
        num_classes = self.num_classes or int(max(e["train_labels"].max(), e["test_labels"].max())) + 1
        metrics = linear_probe_metrics(
            e["train_features"],
            e["train_labels"],
            e["test_features"],
            e["test_labels"],
            num_classes,
            self.l2_regs,
            self.shots,
            self.validation_fraction,
            self.seed,
        )
        metrics.update(
            num_train=float(len(e["train_labels"])),
            num_test=float(len(e["test_labels"])),
            num_classes=float(num_classes),
            skipped=float(e["skipped"]),
        )
        return {f"{self.prefix}/{name}": value for name, value in metrics.items()}
