"""The linear probe: the closed-form ridge fit against NumPy's normal equations, few-shot
sampling, the protocol (held-out choice of the regularisation, refit, few-shot) against a NumPy
re-implementation, and the evaluator on 8 devices against one device."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from align_jax import config as config_lib
from align_jax import sharding
from align_jax.evaluators import (
    LinearProbeEvaluator,
    build_evaluators,
    few_shot_indices,
    fit_ridge,
    linear_probe_metrics,
)
from align_jax.input import demo_data, pipeline
from align_jax.models import DualEncoder, build_model, init_variables, presets
from tests import fixtures


def numpy_ridge_logits(x, y, num_classes, l2, x_test):
    """float64: features standardised by the train mean and deviation, one-hot targets centred,
    W = (Z^T Z + l2 N I)^-1 Z^T (T - mean T), logits = Z_test W + mean T."""
    x, x_test = np.asarray(x, np.float64), np.asarray(x_test, np.float64)
    mean, std = x.mean(0), x.std(0)
    z, z_test = (x - mean) / std, (x_test - mean) / std
    targets = np.eye(num_classes)[y]
    w = np.linalg.solve(z.T @ z + l2 * len(z) * np.eye(z.shape[1]), z.T @ (targets - targets.mean(0)))
    return z_test @ w + targets.mean(0)


def blobs(n, num_classes=5, dim=12, noise=1.5, seed=0):
    """Gaussian clusters around fixed class centres (seed 0), with per-feature scales and offsets
    so that standardisation matters."""
    centres = np.random.default_rng(0).normal(size=(num_classes, dim))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    x = centres[labels] + noise * rng.normal(size=(n, dim))
    return (x * np.linspace(0.5, 20, dim) + np.arange(dim)).astype(np.float32), labels


@pytest.mark.parametrize("n", [200, 7], ids=["more_examples_than_features", "fewer_examples_than_features"])
def test_ridge_fit_equals_the_normal_equations(n):
    x, y = blobs(n)
    x_test, _ = blobs(50, seed=1)
    l2s = np.array([1e-3, 0.1, 10.0])
    classifier = fit_ridge(x, y, 5, l2s)
    logits = np.asarray(classifier.logits(x_test))
    assert logits.shape == (3, 50, 5)
    for r, l2 in enumerate(l2s):
        np.testing.assert_allclose(logits[r], numpy_ridge_logits(x, y, 5, l2, x_test), rtol=2e-3, atol=2e-4)


def test_ridge_ignores_the_scale_of_the_features_even_when_tiny():
    """A randomly initialised tower's features can be ~1e-11: standardisation makes the fit the same."""
    x, y = blobs(100)
    x_test, _ = blobs(30, seed=1)
    l2s = np.array([0.01])
    unscaled = np.asarray(fit_ridge(x, y, 5, l2s).logits(x_test))
    tiny = np.asarray(fit_ridge(x * 1e-11, y, 5, l2s).logits(x_test * 1e-11))
    np.testing.assert_allclose(tiny, unscaled, rtol=1e-3, atol=1e-4)


def test_a_constant_feature_changes_nothing():
    x, y = blobs(100)
    x_test, _ = blobs(30, seed=1)
    with_constant = lambda a: np.concatenate([a, np.full((len(a), 1), 3.0, np.float32)], axis=1)  # noqa: E731
    l2s = np.array([0.01])
    plain = np.asarray(fit_ridge(x, y, 5, l2s).logits(x_test))
    padded = np.asarray(fit_ridge(with_constant(x), y, 5, l2s).logits(with_constant(x_test)))
    assert np.isfinite(padded).all()
    np.testing.assert_allclose(padded, plain, rtol=1e-3, atol=1e-4)


def test_few_shot_takes_k_distinct_examples_of_each_class_reproducibly():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7 + [4] * 20)
    chosen = few_shot_indices(labels, 5, seed=0)
    counts = {c: int(np.sum(labels[chosen] == c)) for c in np.unique(labels)}
    assert counts == {0: 5, 1: 3, 2: 5, 4: 5}  # class 1 has only 3
    assert len(set(chosen.tolist())) == len(chosen) and (np.diff(chosen) > 0).all()
    np.testing.assert_array_equal(few_shot_indices(labels, 5, seed=0), chosen)
    others = [few_shot_indices(labels, 5, seed=s) for s in range(1, 6)]
    assert any(not np.array_equal(o, chosen) for o in others)
    with pytest.raises(ValueError, match="shots must be a positive integer"):
        few_shot_indices(labels, 0)


def numpy_protocol(x, y, x_test, y_test, num_classes, l2s, shots, fraction, seed):
    """The probe's protocol written out: hold out a seeded slice of train, pick the l2 with the
    best held-out top-1 (ties: the largest), refit on all of train, score the test split; k-shot
    fits on k examples per class of the rest (the evaluator's sampler) with the same choice."""
    order = np.random.default_rng(seed).permutation(len(y))
    n_val = int(round(fraction * len(y)))
    val, fit = order[:n_val], order[n_val:]

    def choose(subset):
        accuracies = [
            np.mean(numpy_ridge_logits(x[subset], y[subset], num_classes, l2, x[val]).argmax(1) == y[val]) for l2 in l2s
        ]
        best = max(i for i, a in enumerate(accuracies) if a == max(accuracies))
        return best

    best = choose(fit)
    out = dict(top1=np.mean(numpy_ridge_logits(x, y, num_classes, l2s[best], x_test).argmax(1) == y_test))
    out["l2_reg"] = l2s[best]
    for k in shots:
        subset = fit[few_shot_indices(y[fit], k, seed)]
        index = choose(subset)
        logits = numpy_ridge_logits(x[subset], y[subset], num_classes, l2s[index], x_test)
        out[f"{k}shot_top1"] = np.mean(logits.argmax(1) == y_test)
    return out


def test_protocol_equals_a_numpy_reimplementation():
    x, y = blobs(300, noise=2.5)
    x_test, y_test = blobs(200, noise=2.5, seed=1)
    l2s = (1e-4, 1e-2, 1.0, 100.0)
    got = linear_probe_metrics(x, y, x_test, y_test, 5, l2s, shots=(1, 4), validation_fraction=0.25, seed=3)
    want = numpy_protocol(x, y, x_test, y_test, 5, l2s, (1, 4), 0.25, 3)
    assert got["l2_reg"] == pytest.approx(want["l2_reg"])
    for key in ("top1", "1shot_top1", "4shot_top1"):
        assert abs(got[key] - want[key]) <= 1 / len(y_test), key  # float32 vs float64: one near-tie at most
    assert got["top1"] > 0.3 and 0 <= got["mean_per_class_recall"] <= 1  # chance: 0.2


def test_one_l2_holds_nothing_out():
    x, y = blobs(100)
    x_test, y_test = blobs(60, seed=1)
    got = linear_probe_metrics(x, y, x_test, y_test, 5, l2_regs=(0.1,), validation_fraction=0.0)
    want = np.mean(numpy_ridge_logits(x, y, 5, 0.1, x_test).argmax(1) == y_test)
    assert abs(got["top1"] - want) <= 1 / len(y_test) and got["l2_reg"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_classes=3), "train labels must be classes in"),
        (dict(l2_regs=(0.1, -1.0)), "l2_regs must be positive"),
        (dict(validation_fraction=1.0), "validation_fraction must lie in"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    x, y = blobs(40)
    args = dict(num_classes=5, l2_regs=(0.1, 1.0), validation_fraction=0.2) | kwargs
    with pytest.raises(ValueError, match=message):
        linear_probe_metrics(x, y, x, y, **args)


# --- the evaluator -----------------------------------------------------------------------------

GLOBAL_BATCH = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("demo"))
    demo_data.write_labelled(folder, num_train=60, num_test=21, image_size=48)
    specs = demo_data.specs(folder)
    config = presets.tiny_vit()  # the probe does not depend on the tower; this one compiles fast
    model = build_model(config)
    variables = init_variables(model, config, jax.random.key(0))
    data = pipeline.default_config()
    data.vocab = fixtures.write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt", demo_data.vocab_tokens())
    data.filters.min_image_side = 16
    mesh = sharding.make_mesh([("data", -1), ("fsdp", 1)])
    replicated = jax.device_put(variables, NamedSharding(mesh, P()))
    return dict(
        specs=specs, config=config, model=model, variables=variables, replicated=replicated, data=data, mesh=mesh
    )


def _evaluator(setup, **kwargs) -> LinearProbeEvaluator:
    return LinearProbeEvaluator(
        setup["model"],
        setup["mesh"],
        train_spec=setup["specs"]["labelled_train"],
        test_spec=setup["specs"]["labelled_test"],
        data_config=setup["data"],
        image_size=setup["config"].image_size,
        **{"batch_size": GLOBAL_BATCH, **kwargs},
    )


def _reference(setup, split, method):
    """One unpadded batch of the whole split, the model applied on one device."""
    data = setup["data"].copy_and_resolve_references()
    data.captions = {}
    ds = pipeline.make_dataset(
        setup["specs"][split],
        data,
        image_size=setup["config"].image_size,
        max_text_length=0,
        batch_size=256,
        train=False,
        label_field="label",
        process_index=0,
        process_count=1,
    )
    [batch] = [b for b in ds.as_numpy_iterator() if len(b["images"])]
    return np.asarray(setup["model"].apply(setup["variables"], batch["images"], method=method)), batch["labels"]


@pytest.mark.parametrize("features, method", [("embedding", DualEncoder.encode_image), ("pooled", "image_features")])
def test_evaluator_features_are_those_of_one_device(setup, features, method):
    embedded = _evaluator(setup, features=features).embed(setup["replicated"])
    for split, n in (("train", 60), ("test", 21)):
        want, labels = _reference(setup, f"labelled_{split}", method)
        assert embedded[f"{split}_features"].shape == (n, want.shape[1])
        np.testing.assert_allclose(embedded[f"{split}_features"], want, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(embedded[f"{split}_labels"], labels)


def test_evaluator_metrics_are_the_protocol_on_its_features(setup):
    """`run` is `linear_probe_metrics` on what `embed` returns (whose features the test above
    checks against one device), plus the counts."""
    evaluator = _evaluator(setup, shots=(1, 2), prefix="probe")
    metrics = evaluator.run(setup["replicated"])
    e = evaluator.embed(setup["replicated"])
    num_classes = int(max(e["train_labels"].max(), e["test_labels"].max())) + 1
    want = linear_probe_metrics(
        e["train_features"], e["train_labels"], e["test_features"], e["test_labels"], num_classes, shots=(1, 2)
    )
    assert metrics == {f"probe/{k}": v for k, v in want.items()} | {
        "probe/num_train": 60.0,
        "probe/num_test": 21.0,
        "probe/num_classes": float(num_classes),
        "probe/skipped": 0.0,
    }


def test_evaluator_limits_the_examples(setup):
    embedded = _evaluator(setup, max_train_examples=20, max_examples=5).embed(setup["replicated"])
    assert len(embedded["train_labels"]) == 20 and len(embedded["test_labels"]) == 5


def test_evaluator_refuses_embeddings_of_a_classifier(setup):
    config = ml_collections.ConfigDict(setup["config"].to_dict())
    config.num_classes = 4
    with pytest.raises(ValueError, match="features='embedding' needs a dual encoder"):
        LinearProbeEvaluator(
            build_model(config),
            setup["mesh"],
            train_spec=setup["specs"]["labelled_train"],
            test_spec=setup["specs"]["labelled_test"],
            data_config=setup["data"],
            image_size=32,
            batch_size=GLOBAL_BATCH,
        )


def _train_config(setup, **probe):
    config = config_lib.base_config()
    config.model = ml_collections.ConfigDict(setup["config"].to_dict())
    config.batch_size = GLOBAL_BATCH
    config.data = setup["data"].copy_and_resolve_references()
    config.data.train = setup["specs"]["labelled_train"]
    config.evals.probe = config_lib.linear_probe_eval(**probe)
    return config


def test_config_helper_builds_the_evaluator_and_bad_fields_are_named(setup):
    config = _train_config(setup)
    with pytest.raises(config_lib.ConfigError, match="config.evals.probe.train_data: no data source"):
        config_lib.validate(config, num_devices=8)
    config.evals.probe.train_data = setup["specs"]["labelled_train"]
    config.evals.probe.data = setup["specs"]["labelled_test"]
    config_lib.validate(config, num_devices=8)
    for field, value, message in [
        ("features", "logits", "config.evals.probe.features: must be one of"),
        ("shots", (1, 0), "config.evals.probe.shots: must be positive integers"),
        ("l2_regs", (), "config.evals.probe.l2_regs: must be positive numbers"),
        ("validation_fraction", 0.0, "config.evals.probe.validation_fraction: must lie in"),
    ]:
        bad = _train_config(setup, train_data=config.evals.probe.train_data, data=config.evals.probe.data)
        bad.evals.probe[field] = value
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.validate(bad, num_devices=8)
    [(name, evaluator)] = build_evaluators(config, setup["model"], setup["mesh"]).items()
    assert name == "probe" and isinstance(evaluator, LinearProbeEvaluator) and evaluator.shots == (1, 5, 10)
