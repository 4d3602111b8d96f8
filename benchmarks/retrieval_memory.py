"""Peak host memory and time of chunked Recall@K over a large retrieval set.

    python benchmarks/retrieval_memory.py [--images 20000] [--texts 100000] [--dim 64] [--chunk 1024]

Scores every caption against every image and back in query chunks (`recall_at_k`), never
holding the N x M score matrix (here 20k x 100k float32 = 8 GB). Reports the process's peak
resident memory, the size the full matrix would take, and the time; also checks on the first
2000 x 10000 that the chunked result equals an unchunked NumPy reference. Prints one JSON
object as its last line and rewrites its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402


def reference_recall(images, texts, owner, k):
    """Unchunked NumPy: stable order (score descending, index ascending)."""
    import numpy as np

    scores = texts @ images.T
    t2i_rank = (scores > scores[np.arange(len(texts)), owner][:, None]).sum(1)
    t2i_rank += (
        (scores == scores[np.arange(len(texts)), owner][:, None]) & (np.arange(len(images)) < owner[:, None])
    ).sum(1)
    i2t = []
    for i in range(len(images)):
        positives = np.flatnonzero(owner == i)
        if not len(positives):
            continue
        order = np.argsort(-scores[:, i], kind="stable")
        i2t.append(np.flatnonzero(np.isin(order, positives))[0] < k)
    return float(np.mean(i2t)), float(np.mean(t2i_rank < k))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--texts", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--no_write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    common.emulate_devices(1)
    import numpy as np

    from align_jax.evaluators import recall_at_k

    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.images, args.dim)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    owner = rng.integers(0, args.images, args.texts).astype(np.int32)
    # Captions near their image, so recall is neither 0 nor 1.
    texts = images[owner] + rng.normal(scale=0.2, size=(args.texts, args.dim)).astype(np.float32)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)

    small_images, small = 2000, 10_000
    keep = owner[:small] < small_images
    check = recall_at_k(images[:small_images], texts[:small][keep], owner[:small][keep], ks=(1,), chunk_size=64)
    expected = reference_recall(images[:small_images], texts[:small][keep], owner[:small][keep], 1)
    assert abs(check["i2t_r1"] - expected[0]) < 1e-12 and abs(check["t2i_r1"] - expected[1]) < 1e-12, (check, expected)

    start = time.perf_counter()
    metrics = recall_at_k(images, texts, owner, chunk_size=args.chunk)
    seconds = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    full_gib = args.images * args.texts * 4 / 2**30
    result = dict(
        images=args.images,
        texts=args.texts,
        dim=args.dim,
        chunk=args.chunk,
        seconds=round(seconds, 1),
        peak_rss_gib=round(peak_gib, 2),
        full_score_matrix_gib=round(full_gib, 2),
        matches_unchunked_on_2000x10000=True,
        **{k: round(v, 4) for k, v in metrics.items()},
    )
    if not args.no_write:
        common.write_section(
            "Retrieval memory (retrieval_memory.py)",
            f"{common.machine()}. Chunked Recall@K (`align_jax.evaluators.recall_at_k`, query chunks of "
            f"{args.chunk}) over {args.images} images x {args.texts} captions, {args.dim}-d: peak process memory "
            f"{result['peak_rss_gib']} GiB (Python, JAX and the embeddings included) where the score matrix alone "
            f"would take {result['full_score_matrix_gib']} GiB; {result['seconds']} s for both directions. The "
            "chunked result equals an unchunked NumPy reference on the first 2000 x 10000.\n",
        )
    common.print_json(result)


if __name__ == "__main__":
    main()
