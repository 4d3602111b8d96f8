"""One pass over an evaluation set by every process in step, for evaluators that shard batches
over a (possibly multi-host) mesh: each step is a collective, so all processes must take the same
number of steps even when their shares of the set differ in size."""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf
from jax.experimental import multihost_utils


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
