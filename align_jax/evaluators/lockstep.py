"""One pass over an evaluation set by every process in step, for evaluators that shard batches
over a (possibly multi-host) mesh: each step is a collective, so all processes must take the same
number of steps even when their shares of the set differ in size."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import numpy as np
import tensorflow as tf
from jax.experimental import multihost_utils

from align_jax.input import pipeline


def gather(x) -> np.ndarray:
    """A global array (or this process's host values, concatenated in process order) on every host."""
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


class LockstepPass:
    """Iterates this process's batches of a finite pipeline pass (`make_dataset(train=False)`):
    yields the local batch, or None once this process has run out while others have not; steps
    where no process has rows (a pass's last batch may carry only the skip counts) are skipped.
    Breaking out early is fine as long as every process decides it from gathered values."""

    def __init__(self, dataset: tf.data.Dataset):
        self._iterator = dataset.as_numpy_iterator()
        self._skipped = np.zeros(1, np.int64)

    def __iter__(self) -> Iterator[dict | None]:
        while True:
            batch = next(self._iterator, None)
            rows = gather(np.array([-1 if batch is None else len(batch["images"])]))
            if (rows < 0).all():
                return
            if batch is not None:
                self._skipped = batch["skipped"].sum(keepdims=True)  # cumulative over the pass
            if (rows > 0).any():
                yield batch

    def total_skipped(self) -> int:
        """Examples the input filters dropped so far, over all processes (a collective)."""
        return int(gather(self._skipped).sum())


def labelled_image_pass(
    dataset: tf.data.Dataset,
    mesh: jax.sharding.Mesh,
    local_batch_size: int,
    apply_fn: Callable[[jax.Array], jax.Array],
    max_examples: int = 0,
) -> tuple[np.ndarray, np.ndarray, int]:
    """`(outputs [N, ...], labels [N], skipped)` over one lockstep pass of a labelled image set
    (`pipeline.make_dataset(label_field=...)`), on every host: each process's batch is
    zero-padded to `local_batch_size` rows (one shape, one compile), sharded over the mesh and
    mapped by `apply_fn(images)`; only real rows are kept, the first `max_examples` when set."""
    spec = dataset.element_spec["images"]
    outputs, labels = [], []
    num_rows = 0
    lockstep = LockstepPass(dataset)
    for batch in lockstep:
        n = 0 if batch is None else len(batch["images"])
        padded = dict(
            images=np.zeros((local_batch_size, *spec.shape[1:]), spec.dtype.as_numpy_dtype),
            labels=np.full(local_batch_size, -1, np.int32),  # int32: JAX's default integer width
        )
        if n:
            padded["images"][:n], padded["labels"][:n] = batch["images"], batch["labels"]
        padded["valid"] = np.arange(local_batch_size) < n
        arrays = pipeline.to_global_batch(padded, mesh, keys=tuple(padded))
        valid = gather(arrays["valid"])
        outputs.append(gather(apply_fn(arrays["images"]))[valid])
        labels.append(gather(arrays["labels"])[valid])
        num_rows += int(valid.sum())
        if max_examples and num_rows >= max_examples:
            break
    skipped = lockstep.total_skipped()
    if not num_rows:
        raise ValueError(f"the labelled image set yielded no images ({skipped} skipped by the filters)")
    return np.concatenate(outputs)[: max_examples or None], np.concatenate(labels)[: max_examples or None], skipped
