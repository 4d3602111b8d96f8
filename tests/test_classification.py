"""The classification task's pieces: the image classifier, its loss, its sharded step against one
device, its evaluator, and the config checks that name the field."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from align_jax import config as config_lib
from align_jax import losses, sharding, tasks, train_step
from align_jax.evaluators import ClassificationEvaluator, build_evaluators, classification_metrics
from align_jax.input import demo_data, pipeline
from align_jax.models import DualEncoder, ImageClassifier, build_model, init_variables, presets
from tests import fixtures

NUM_CLASSES = 5
GLOBAL_BATCH = 16


def _classifier_config(num_classes=NUM_CLASSES):
    """The tiny ViT's tower (fast to compile; the classifier does not depend on the tower)."""
    config = presets.tiny_vit()
    config.num_classes = num_classes
    return config


def test_classifier_is_the_dual_encoders_tower_with_a_zero_head():
    config = _classifier_config()
    classifier = build_model(config)
    assert isinstance(classifier, ImageClassifier) and classifier.num_classes == NUM_CLASSES
    variables = init_variables(classifier, config, jax.random.key(0))
    assert set(variables["params"]) == {"image_tower", "head"}
    assert not np.any(np.asarray(variables["params"]["head"]["kernel"]))
    dual_config = ml_collections.ConfigDict(config.to_dict())
    del dual_config.num_classes
    dual = build_model(dual_config)
    dual_variables = init_variables(dual, dual_config, jax.random.key(1))
    # The same tower variables read by both models give the same pooled features.
    tower = dict(params=dict(variables["params"], image_tower=dual_variables["params"]["image_tower"]))
    images = fixtures.random_images(3, 32)
    features = classifier.apply(tower, images, method="image_features")
    np.testing.assert_allclose(
        features, dual.apply(dual_variables, images, method=DualEncoder.image_features), rtol=1e-6
    )
    head = dict(kernel=jnp.ones((features.shape[1], NUM_CLASSES)), bias=jnp.arange(NUM_CLASSES, dtype=jnp.float32))
    logits = classifier.apply(dict(tower, params=dict(tower["params"], head=head)), images)
    want = np.asarray(features).sum(1, keepdims=True) + np.arange(NUM_CLASSES)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


def test_num_classes_must_be_a_non_negative_integer():
    with pytest.raises(ValueError, match="model.num_classes must be a non-negative integer"):
        build_model(_classifier_config(-1))


def test_smoothed_cross_entropy_equals_numpy():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(6, 4)) * 3, rng.integers(0, 4, 6)
    for smoothing in (0.0, 0.1):
        targets = (1 - smoothing) * np.eye(4)[labels] + smoothing / 4
        log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        want = -(targets * log_probs).sum(1).mean()
        got = losses.softmax_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), smoothing)
        assert float(got) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="expected logits"):
        losses.softmax_cross_entropy(jnp.zeros((6, 4)), jnp.zeros((5,), jnp.int32))


def test_sharded_classification_step_equals_one_device():
    """8 devices, data=4 x fsdp=2: the step's loss and updated parameters (and BatchNorm
    statistics) equal plain SGD on the gradient of the smoothed cross-entropy computed on one
    device (written here)."""
    config = fixtures.three_stage_tiny(32, 8)
    config.image.drop_connect_rate = 0.0  # the sharded and the one-device step draw no masks
    config.num_classes = NUM_CLASSES
    model = build_model(config)
    smoothing, lr = 0.1, 0.5
    tx = optax.sgd(lr)
    mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
    state, shardings = train_step.create_train_state(model, config, tx, mesh, jax.random.key(0))
    # A non-zero head, so the tower gets gradients too.
    head = jax.random.normal(jax.random.key(3), state.params["head"]["kernel"].shape) * 0.1
    state = state.replace(params=dict(state.params, head=dict(state.params["head"], kernel=head)))
    state = jax.device_put(state, shardings)
    images = jax.random.uniform(jax.random.key(1), (GLOBAL_BATCH, 32, 32, 3), minval=-1, maxval=1)
    labels = jax.random.randint(jax.random.key(2), (GLOBAL_BATCH,), 0, NUM_CLASSES)
    params, batch_stats = jax.device_get((state.params, state.batch_stats))

    def reference_loss(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
        )
        targets = (1 - smoothing) * jax.nn.one_hot(labels, NUM_CLASSES) + smoothing / NUM_CLASSES
        return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), axis=1)), updates["batch_stats"]

    (want_loss, want_stats), grads = jax.jit(jax.value_and_grad(reference_loss, has_aux=True))(params)
    step = train_step.make_classification_train_step(model, smoothing, tx, optax.constant_schedule(lr), mesh, shardings)
    batch = pipeline.to_global_batch(
        dict(images=np.asarray(images), labels=np.asarray(labels)), mesh, ("images", "labels")
    )
    new_state, metrics = step(state, batch)
    assert float(metrics["loss"]) == pytest.approx(float(want_loss), rel=1e-5)
    assert "temperature" not in metrics and 0 <= float(metrics["top1"]) <= 1
    want_params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(jax.device_get(new_state.params)), jax.tree.leaves(want_params), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    for got, want in zip(
        jax.tree.leaves(jax.device_get(new_state.batch_stats)), jax.tree.leaves(want_stats), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


# --- the evaluator -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("demo"))
    demo_data.write_labelled(folder, num_train=8, num_test=21, image_size=48)
    config = _classifier_config(len(demo_data.class_names()))
    model = build_model(config)
    variables = init_variables(model, config, jax.random.key(0))
    kernel = jax.random.normal(jax.random.key(1), variables["params"]["head"]["kernel"].shape)
    variables = dict(variables, params=dict(variables["params"], head=dict(variables["params"]["head"], kernel=kernel)))
    data = pipeline.default_config()
    data.vocab = fixtures.write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt", demo_data.vocab_tokens())
    data.filters.min_image_side = 16
    mesh = sharding.make_mesh([("data", -1), ("fsdp", 1)])
    return dict(
        specs=demo_data.specs(folder),
        config=config,
        model=model,
        variables=variables,
        replicated=jax.device_put(variables, NamedSharding(mesh, P())),
        data=data,
        mesh=mesh,
    )


def test_evaluator_metrics_are_those_of_one_device(setup):
    evaluator = ClassificationEvaluator(
        setup["model"],
        setup["mesh"],
        data_spec=setup["specs"]["labelled_test"],
        data_config=setup["data"],
        image_size=32,
        batch_size=GLOBAL_BATCH,
        prefix="cls",
    )
    metrics = evaluator.run(setup["replicated"])
    data = setup["data"].copy_and_resolve_references()
    data.captions = {}
    ds = pipeline.make_dataset(
        setup["specs"]["labelled_test"],
        data,
        image_size=32,
        max_text_length=0,
        batch_size=64,
        train=False,
        label_field="label",
        process_index=0,
        process_count=1,
    )
    [batch] = [b for b in ds.as_numpy_iterator() if len(b["images"])]
    logits = np.asarray(setup["model"].apply(setup["variables"], batch["images"]))
    want = classification_metrics(logits, batch["labels"], ks=(1, 5))
    assert metrics["cls/num_images"] == 21 and metrics["cls/skipped"] == 0
    for key, value in want.items():
        assert metrics[f"cls/{key}"] == pytest.approx(value), key


def test_evaluator_needs_a_classifier(setup):
    dual_config = fixtures.three_stage_tiny(32, 8)
    with pytest.raises(ValueError, match="needs an image classifier"):
        ClassificationEvaluator(
            build_model(dual_config),
            setup["mesh"],
            data_spec=setup["specs"]["labelled_test"],
            data_config=setup["data"],
            image_size=32,
            batch_size=GLOBAL_BATCH,
        )


def _classification_config(setup):
    config = config_lib.base_config()
    config.task = "classification"
    config.model = ml_collections.ConfigDict(setup["config"].to_dict())
    config.batch_size = GLOBAL_BATCH
    config.data = setup["data"].copy_and_resolve_references()
    config.data.train = setup["specs"]["labelled_train"]
    config.data.eval = setup["specs"]["labelled_test"]
    config.evals.cls = config_lib.classification_eval()
    return config


def test_task_checks_name_the_field(setup):
    config = _classification_config(setup)
    config_lib.validate(config, num_devices=8)
    [(name, evaluator)] = build_evaluators(config, setup["model"], setup["mesh"]).items()
    assert name == "cls" and isinstance(evaluator, ClassificationEvaluator)
    assert tasks.get(config).batch_keys == ("images", "labels")
    with pytest.raises(ValueError, match="task must be one of"):
        tasks.get(ml_collections.ConfigDict(dict(task="captioning")))

    cases = [
        ("task", "captioning", "config.task: must be one of"),
        ("model.num_classes", 0, "config.model.num_classes: the classification task needs classes"),
        ("accum_steps", 2, "config.accum_steps: gradient accumulation is for the contrastive task"),
        ("data.label_field", "", "config.data.label_field: the classification task needs a label field"),
        ("evals.cls", config_lib.retrieval_eval(), "config.evals.cls.type: 'retrieval' does not apply"),
        ("evals.cls", config_lib.linear_probe_eval(), "config.evals.cls.features: an image classifier has no"),
    ]
    for field, value, message in cases:
        bad = _classification_config(setup)
        *parents, leaf = field.split(".")
        node = bad
        for parent in parents:
            node = node[parent]
        node[leaf] = value
        if field == "evals.cls" and value.type == "linear_probe":
            value.update(train_data=setup["specs"]["labelled_train"], data=setup["specs"]["labelled_test"])
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.validate(bad, num_devices=8)

    contrastive = _classification_config(setup)
    contrastive.task = "contrastive"
    contrastive.evals = ml_collections.ConfigDict()
    with pytest.raises(config_lib.ConfigError, match="config.model.num_classes: must be 0 for the contrastive task"):
        config_lib.validate(contrastive, num_devices=8)
