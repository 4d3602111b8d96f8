"""Embedding (inference) throughput (images/s) of align_jax against HF transformers `AlignModel`
(PyTorch, CPU).

    python -m benchmarks.embed_throughput [--configs tiny,small,bert_heavy] [--batch 32] [--rounds 5]

One step embeds a batch of images and as many captions, both towers in inference mode, float32,
L2-normalised: align_jax `encode_image` + `encode_text` in one jitted function (compile time
reported separately); PyTorch `get_image_features` + `get_text_features` under
`torch.inference_mode()`, in `eval()`, channels_last. img/s = image-caption pairs per second.
Configs and inputs are matched as in train_throughput.py (benchmarks/torch_reference.py).
Prints one JSON object last (per config: align_jax_img_s, torch_img_s, ratio) and rewrites its
section of RESULTS.md.
"""

from __future__ import annotations

import argparse

from benchmarks import torch_reference as ref

MODULE = "benchmarks.embed_throughput"
SECTION = "Embedding throughput vs HF PyTorch (embed_throughput.py)"
TARGETS = {"small": 1.2, "bert_heavy": 1.2}  # issue 8: align_jax / HF img/s


def jax_worker(name: str, args: argparse.Namespace) -> dict:
    import time

    import jax

    from align_jax.models import DualEncoder, build_model, init_variables

    config = ref.matched_config(name)
    model = build_model(config)
    variables = init_variables(model, config, jax.random.key(ref.SEED))
    batch = jax.device_put(ref.synthetic_batch(config, args.batch), jax.devices()[0])

    def embed(variables, batch):
        images = model.apply(variables, batch["images"], method=DualEncoder.encode_image)
        texts = model.apply(variables, batch["input_ids"], batch["attention_mask"], method=DualEncoder.encode_text)
        return images, texts

    start = time.perf_counter()
    compiled = jax.jit(embed).lower(variables, batch).compile()
    compile_s = time.perf_counter() - start
    cpu_times = []
    times = ref.time_steps(
        lambda: jax.block_until_ready(compiled(variables, batch)), args.warmup, args.steps, cpu_times
    )
    return ref.worker_result("jax", name, args.batch, times, cpu_times, compile_s=round(compile_s, 2), torch_mode="-")


def torch_worker(name: str, args: argparse.Namespace) -> dict:
    import torch

    config = ref.matched_config(name)
    model = ref.build_hf_model(config).eval()
    inputs = ref.torch_inputs(ref.synthetic_batch(config, args.batch))

    def embed(inputs):
        images = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        texts = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        texts = texts.pooler_output
        return images / images.norm(dim=-1, keepdim=True), texts / texts.norm(dim=-1, keepdim=True)

    embed, mode = ref.maybe_compile(embed, args.torch_mode)

    def run_step():
        with torch.inference_mode():
            embed(inputs)

    cpu_times = []
    times = ref.time_steps(run_step, args.warmup, args.steps, cpu_times)
    return ref.worker_result("torch", name, args.batch, times, cpu_times, torch_mode=mode)


def main(argv: list[str] | None = None) -> dict:
    args = ref.make_parser(__doc__, steps=10).parse_args(argv)
    if args.worker:
        return ref.run_as_worker(args, dict(jax=jax_worker, torch=torch_worker))
    return ref.compare_and_report(
        args,
        argv,
        module=MODULE,
        section=SECTION,
        targets=TARGETS,
        what="One step = embed a batch of images and as many captions, both towers in inference mode, "
        "L2-normalised. align_jax: `encode_image` + `encode_text` in one jitted function; PyTorch: "
        "`get_image_features` + `get_text_features` under `torch.inference_mode()`.",
    )


if __name__ == "__main__":
    main()
