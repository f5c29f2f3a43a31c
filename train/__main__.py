"""``python -m jaxattn.train {lm,image} --model NAME [options]`` (console script ``jaxattn-train``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jaxattn.train.loop import add_config_args, check_positive, config_from_args

COMPUTE = {"dtype": ["float32", "bfloat16"], "attn_impl": ["auto", "pallas", "xla"]}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true")


def _add_lm(sub) -> None:
    from jaxattn.train.lm import LMConfig

    p = sub.add_parser("lm", help="language modelling (default: TNL on the Python stdlib's bytes)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_args(p, LMConfig, choices={**COMPUTE, "ring_layout": ["contiguous", "zigzag"]}, help={
        "model": "a name from jaxattn.models.MODEL_CONFIGS, or a Hugging Face TransNormerLLM / LLaMA / Qwen2 "
                 "folder to fine-tune (with --data token files of its tokenizer)",
        "remat": "activation checkpointing: recompute each block in the backward (less memory, ~1/3 more compute)",
        "ema_decay": "keep a moving average of the weights with this decay and evaluate it too (val_loss_ema; 0: "
                     "off); generate / export --ema use it",
        "data": "text file or folder (bytes), or token files (.npy, nanoGPT's uint16 .bin; a folder with train/val "
                "files); default: the Python stdlib sources",
        "seq_parallel": "devices that share each sequence (TNL: sequence-parallel Lightning attention, GPT: "
                        "ring attention, its recurrent layers sequence parallel); the other devices split the batch",
        "ring_layout": "GPT with --seq-parallel: ring attention's shard layout; zigzag gives every device two "
                       "chunks (i, 2P-1-i) so causal work is balanced (--seq-len divisible by 2 x --seq-parallel)",
        "fsdp": "shard parameters and optimizer state over the data-parallel devices (FSDP / ZeRO-3): each holds "
                "about 1/N of them, for models whose AdamW state does not fit one device; same steps",
        "expert_parallel": "mixtures of experts: split the experts (and their AdamW state) over the data-parallel "
                           "devices, each device's tokens sent to their experts' devices and back (all-to-all; "
                           "dropless: the same steps)",
        "model_args": "model config fields as 'key=value ...' (tuples comma-separated), e.g. "
                      "'layers=8 dim=256' or, on a pretrained GPT, 'layer_types=power,power,power,full window=1024'",
        "lora_rank": "LoRA: train rank-r adapters on the linear layers and nothing else (0: full fine-tuning); "
                     "exports fold them into the weights",
        "lora_alpha": "LoRA scale alpha / rank (default 2 * rank)",
        "lora_targets": "LoRA: comma-separated layer names (GPT: q,kv,o,gate_up or up,down; default: every linear layer "
                        "but the output head)",
        "base_dtype": "LoRA on a Hugging Face folder: store its frozen weights in this dtype (bfloat16: half their "
                      "memory; the adapters stay fp32)",
        "doc_mask": "packed documents: each token attends (TNL: mixes) only within its own document, positions "
                    "restarting at each (documents: the files of a text corpus, or --doc-sep in token files)",
        "doc_loss_mask": "the loss skips each target that begins a new document (predicted from the previous "
                         "document's last token; Megatron's --eod-mask-loss); with or without --doc-mask",
        "doc_sep": "with --doc-mask / --doc-loss-mask: the token id that ends each document (GPT-2's end-of-text: 50256); default: "
                   "a text corpus's file boundaries"})
    _common(p)


def _add_image(sub) -> None:
    from jaxattn.train.image import DATASETS, ImageConfig

    p = sub.add_parser("image", help="image classification (default: scikit-learn's digits at 32x32)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_args(p, ImageConfig, choices={**COMPUTE, "dataset": DATASETS, "gates": ["none", "features", "tokens"],
                                             "gate_mode": ["routed", "joint", "none"]}, help={
        "model": "an image model from jaxattn.models.MODEL_CONFIGS (vit-tiny, halonet-tiny, ...), or a timm hub "
                 "folder to fine-tune (ViT / DeiT / HaloNet; classifier, input channels and position grid adapted)",
        "data": "cifar-10-batches-py/ or cifar-100-python/ folder, or an image folder "
                "(root/{train,val}/<class>/*.png|jpg, or root/<class>/* split by --val-fraction); "
                "default: scikit-learn's bundled digits",
        "dataset": "how to read --data (auto: detect)",
        "image_size": "images are resized to this (digits: 8x8 upsampled bilinearly)",
        "val_fraction": "held-out fraction when the data has no test split (digits, one-folder trees)",
        "label_smoothing": "cross-entropy label smoothing",
        "mixup": "Mixup: Beta(a, a) parameter of the blend weight (0: off; DeiT: 0.8)",
        "cutmix": "CutMix: Beta(a, a) parameter of the kept area (0: off; DeiT: 1.0)",
        "mix_prob": "probability that a batch is mixed (Mixup or CutMix)",
        "mix_switch_prob": "with both on: probability of CutMix rather than Mixup for a batch",
        "erase_prob": "random erasing (timm's RandomErasing, pixel mode): probability per image (DeiT: 0.25)",
        "randaug_ops": "RandAugment: ops per image (0: off; DeiT: 2), each applied with probability 0.5",
        "randaug_magnitude": "RandAugment magnitude (0-10; DeiT: 9)",
        "randaug_std": "RandAugment magnitude noise std (DeiT: 0.5)",
        "ema_decay": "keep a moving average of the weights with this decay and evaluate it too (test_acc_ema; "
                     "0: off; timm's ImageNet default 0.9998); export --ema writes it",
        "crop_padding": "random-crop padding in pixels (default: image_size // 8 for CIFAR and folders, 0 for digits)",
        "flip": "random horizontal flips (default: on for CIFAR and folders, off for digits)",
        "eval_batch_size": "batch size of the test-set evaluation",
        "gates": "hard-attention gates: ViT 'features' (per block branch) or 'tokens'; HaloNet: stage gates",
        "gate_mode": "routed: gradient routing (gate pass, then backbone pass); joint: one multi_transform step",
        "gate_lr": "Adam learning rate of the gate parameters",
        "rra": "train with Residual Relationship Attention + RPE over the batch (bypassed at eval)",
        "remat": "ViT and HaloNet models: activation checkpointing per block (less memory, ~1/3 more compute)",
        "model_args": "model config fields as 'key=value ...' (tuples comma-separated), e.g. 'depth=6 heads=8'",
        "lora_rank": "LoRA: train rank-r adapters on the linear layers and the classifier head only (0: full "
                     "fine-tuning); exports fold the adapters into the weights",
        "lora_alpha": "LoRA scale alpha / rank (default 2 * rank)",
        "lora_targets": "LoRA: comma-separated layer names (ViT: qkv,proj,fc1,fc2; default: every linear layer "
                        "outside the head)"})
    _common(p)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxattn.train")
    sub = parser.add_subparsers(dest="task", required=True)
    _add_lm(sub)
    _add_image(sub)
    from jaxattn.train.sparsifiner import add_parser as _add_sparsifiner

    _add_sparsifiner(sub)
    from jaxattn.train.probe import add_parser as _add_probe

    _add_probe(sub)
    from jaxattn.train.text import add_parser as _add_text

    _add_text(sub)
    args = vars(parser.parse_args(argv))
    task = args.pop("task")
    if task == "sparsifiner":
        from jaxattn.train.sparsifiner import main_from_args

        try:
            return main_from_args(args)
        except ValueError as e:
            parser.error(str(e))
    resume, no_progress = args.pop("resume"), args.pop("no_progress")
    if task == "probe":
        from jaxattn.train.probe import run_cli, train

        cfg = run_cli(parser, args)
    elif task == "text":
        from jaxattn.train.text import run_cli, train

        cfg = run_cli(parser, args)
    elif task == "lm":
        from jaxattn.train.lm import LMConfig, train

        try:
            cfg = config_from_args(LMConfig, args)
        except ValueError as e:  # (the config's own checks)
            parser.error(str(e))
        check_positive(parser, cfg, ("steps", "seq_len", "batch_size", "grad_accum", "seq_parallel", "ckpt_every",
                                     "log_every"))
    else:
        from jaxattn.train.image import ImageConfig, train

        try:
            cfg = config_from_args(ImageConfig, args)
        except ValueError as e:  # (the config's own checks)
            parser.error(str(e))
        check_positive(parser, cfg, ("steps", "image_size", "batch_size", "grad_accum", "ckpt_every", "log_every",
                                     "eval_batch_size"))
        check_positive(parser, cfg, ("warmup", "eval_every", "crop_padding"), minimum=0)
        if not 0 <= cfg.label_smoothing < 1:
            parser.error(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    try:
        train(cfg, resume=resume, progress=not no_progress)
    except ValueError as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
