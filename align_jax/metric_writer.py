"""Training scalars to TensorBoard event files and a JSONL file (one object per line)."""

from __future__ import annotations

import json
import math
import os

import tensorflow as tf
from etils import epath

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
    """Writes `{name: scalar}` at a step. Only one process of a multi-process job writes
    (`enabled`). On resume the JSONL file is cut back to the restored step, so a run that was
    killed and resumed leaves the same lines as one that was not."""

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = epath.Path(workdir) / METRICS_FILE
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._truncate_after(resume_step)
        self._jsonl = self.path.open("a")
        self._summary = tf.summary.create_file_writer(os.fspath(epath.Path(workdir) / TENSORBOARD_DIR))

    def _truncate_after(self, step: int) -> None:
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items() if v is not None}
        record = {"step": int(step), **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
        self._jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        self._jsonl.flush()
        with self._summary.as_default(step=int(step)):
            for name, value in clean.items():
                tf.summary.scalar(name, value)
        self._summary.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._summary.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The JSONL records of a workdir, in order."""
    path = epath.Path(workdir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
