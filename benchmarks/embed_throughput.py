"""Embedding (inference) throughput (images/s) of align_jax against HF transformers `AlignModel`
(PyTorch, CPU).

    python -m benchmarks.embed_throughput [--configs tiny,small,bert_heavy] [--batch 32] [--rounds 5]

One step embeds a batch of images and a batch of captions (the same number), both towers in
inference mode, float32, L2-normalised: align_jax `encode_image` + `encode_text` in one jitted
function (compile time reported separately); PyTorch `get_image_features` + `get_text_features`
under `torch.inference_mode()`, in `eval()`, channels_last. img/s = image-caption pairs per
second. Same matching of configs and inputs as train_throughput.py (benchmarks/torch_reference.py).
Prints one JSON object last (per config: align_jax_img_s, torch_img_s, ratio) and rewrites its
section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import torch_reference as ref

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

    def run_step():
        jax.block_until_ready(compiled(variables, batch))

    times = ref.time_steps(run_step, args.warmup, args.steps)
    return ref.worker_result("jax", name, args.batch, times, compile_s=round(compile_s, 2), torch_mode="-")


def torch_worker(name: str, args: argparse.Namespace) -> dict:
    import torch

    ref.configure_torch(args.threads)
    config = ref.matched_config(name)
    model = ref.build_hf_model(config).eval()
    inputs = ref.torch_inputs(ref.synthetic_batch(config, args.batch))

    def embed(inputs):
        images = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        texts = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        texts = texts.pooler_output
        return (
            images / images.norm(dim=-1, keepdim=True),
            texts / texts.norm(dim=-1, keepdim=True),
        )

    embed, mode = ref.maybe_compile(embed, args.torch_mode)

    def run_step():
        with torch.inference_mode():
            embed(inputs)

    times = ref.time_steps(run_step, args.warmup, args.steps)
    return ref.worker_result("torch", name, args.batch, times, torch_mode=mode)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ref.add_arguments(parser, steps=10)
    args = parser.parse_args(argv)
    if args.worker:
        ref.pin_threads(args.threads)
        worker = jax_worker if args.worker == "jax" else torch_worker
        out = worker(args.configs, args)
        ref.common.print_json(out)
        return out

    summary = ref.compare("benchmarks.embed_throughput", args, TARGETS, jax_extra=("compile_s",))
    summary["benchmark"] = "embed_throughput"
    command = "python -m benchmarks.embed_throughput " + " ".join(argv if argv is not None else sys.argv[1:])
    compile_line = ", ".join(
        f"{name} {r['align_jax_compile_s']:.0f} s" for name, r in summary["results"].items()
    )
    ref.write_results(
        SECTION,
        ref.environment_line(summary, command.strip())
        + "\n\nOne step = embed a batch of images and as many captions, both towers in inference mode, "
        "L2-normalised. align_jax: `encode_image` + `encode_text` in one jitted function; PyTorch: "
        "`get_image_features` + `get_text_features` under `torch.inference_mode()`, "
        f"{summary['results'][next(iter(summary['results']))]['torch_mode']}. align_jax compile time "
        f"(excluded from the rates, median per worker): {compile_line}.\n\n"
        + ref.results_table(summary, "img/s"),
        args.no_results,
    )
    ref.common.print_json(summary)
    return summary


if __name__ == "__main__":
    main()
