"""``python -m jaxattn.perplexity MODEL [DATA]``: a language model's perplexity on a token file or text,
with a sliding window (as Hugging Face's perplexity guide): windows of ``--context`` tokens start every
``--stride`` tokens, and each scores only the targets its predecessors did not, so every token after
the first is predicted once, with at least ``context - stride`` tokens of context (``stride == context``:
disjoint windows). ``MODEL``: a Hugging Face folder (TransNormerLLM, LLaMA,
Qwen2, Mistral; text needs its tokenizer's library, token files do not) or a language-model training run
(``DATA`` defaults to its own validation split). ``--model-args`` changes a folder's jaxattn config, e.g.
``"layer_types=power,full window=1024"`` to score a pretrained model under PowerAttention.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``[(begin, end, first_scored)]`` over ``n`` tokens: the window reads ``tokens[begin:end + 1]``
    (``end - begin <= context`` targets, target ``t`` predicting ``tokens[t + 1]``) and scores targets
    ``first_scored .. end - 1``; together they score targets ``0 .. n - 2`` once each."""
    if context < 1 or not 1 <= stride <= context:
        raise ValueError(f"--context must be >= 1 and --stride in [1, context], got {context}, {stride}")
    out, done, begin = [], 0, 0
    while done < n - 1:
        end = min(begin + context, n - 1)
        out.append((begin, end, done))
        done, begin = end, begin + stride
    return out


def token_nll(model, tokens: np.ndarray, *, context: int, stride: int, batch_size: int = 8,
              progress: bool = True) -> np.ndarray:
    """The NLL (nats, fp32) of every target: ``[len(tokens) - 1]``, entry ``t`` for predicting ``tokens[t + 1]``
    (see :func:`windows`). Windows run ``batch_size`` at a time at one fixed length (short ones padded at
    the end, which a causal model never reads back)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tqdm import tqdm

    from jaxattn.train.losses import cross_entropy_with_integer_labels

    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or len(tokens) < 2:
        raise ValueError(f"tokens must be a 1-D sequence of at least 2 ids, got shape {tokens.shape}")
    spans = windows(len(tokens), context, stride)
    length = max(end - begin for begin, end, _ in spans)
    gdef, state = nnx.split(model)

    @jax.jit
    def nll(state, x):
        m = nnx.merge(gdef, state)
        return cross_entropy_with_integer_labels(m(x[:, :-1]).astype(jnp.float32), x[:, 1:])

    out = np.full(len(tokens) - 1, np.nan, np.float32)
    for s in tqdm(range(0, len(spans), batch_size), desc="perplexity", unit="batch", disable=not progress or None,
                  leave=False):
        group = spans[s:s + batch_size]
        x = np.zeros((batch_size, length + 1), np.int32)
        for i, (begin, end, _) in enumerate(group):
            x[i, :end - begin + 1] = tokens[begin:end + 1]
        got = np.asarray(nll(state, jnp.asarray(x)))
        for i, (begin, end, first) in enumerate(group):
            out[first:end] = got[i, first - begin:end - begin]
    return out


def _load(model_dir: str, model_args: str | None, dtype: str | None, adapter: str | None = None):
    """``(model, tokenizer or None, byte_level, run's validation tokens or None, description)``."""
    from jaxattn.generate import load_language_model
    from jaxattn.models import hf

    if (model_args or dtype) and hf.hf_model_type(model_dir) is None:
        raise ValueError("--model-args and --dtype apply to Hugging Face folders; a run keeps its own config")
    model, tokenizer, byte_level, cfg, what = load_language_model(model_dir, dtype=dtype, model_args=model_args,
                                                                  flag="", adapter=adapter)
    if cfg is None:
        return model, tokenizer, byte_level, None, what
    from jaxattn.train.data import load_corpus

    model.eval()
    own_val = lambda: load_corpus(cfg.data, max_bytes=cfg.max_bytes, vocab_size=cfg.vocab_size).val  # noqa: E731
    return model, None, byte_level, own_val, what


def _tokens(data: str | None, tokenizer, byte_level: bool, own_val, max_tokens: int | None) -> tuple[np.ndarray, str]:
    from jaxattn.train.data import TOKEN_SUFFIXES, _text_bytes, token_file

    if data is None:
        if own_val is None:
            raise ValueError("DATA is needed for a Hugging Face folder (a token file, or text with its tokenizer)")
        tokens, what = own_val(), "the run's validation split"
    else:
        path = Path(data)
        if not path.exists():
            raise ValueError(f"{data}: no such file or folder")
        if path.suffix in TOKEN_SUFFIXES:
            tokens, what = token_file(path), str(path)
        else:
            raw = _text_bytes(path, max_tokens * 16 if max_tokens else 1 << 40)
            if byte_level:
                tokens = np.frombuffer(raw, np.uint8)
            elif tokenizer is not None:
                tokens = tokenizer.encode(raw.decode("utf-8", errors="replace"))
            else:
                raise ValueError(f"{data}: text needs the model's tokenizer (sentencepiece / tokenizers not installed, "
                                 "or the folder has none), or give a token file (.npy / .bin)")
            what = str(path)
    tokens = np.asarray(tokens[:max_tokens] if max_tokens else tokens)
    return tokens, what


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxattn.perplexity", description=__doc__)
    p.add_argument("model", help="a Hugging Face folder (TransNormerLLM, LLaMA, Qwen2, Mistral) or an lm training run")
    p.add_argument("data", nargs="?", default=None,
                   help="token file (.npy / .bin) or text file / folder (default for a run: its validation split)")
    p.add_argument("--context", type=int, default=1024, help="tokens per window")
    p.add_argument("--stride", type=int, default=None, help="window step (default: context // 2)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first this many tokens")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="a folder's compute and parameter dtype")
    p.add_argument("--model-args", default=None, help="a folder's config fields, 'key=value ...' (e.g. attention pattern)")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter folder folded into the folder's weights")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    stride = a.stride or max(1, a.context // 2)
    try:
        model, tokenizer, byte_level, own_val, what = _load(a.model, a.model_args, a.dtype, a.adapter)
        tokens, source = _tokens(a.data, tokenizer, byte_level, own_val, a.max_tokens)
        vocab = model.cfg.vocab_size
        if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
            raise ValueError(f"{source}: token ids must be in [0, {vocab}) (the model's vocabulary)")
        nll = token_nll(model, tokens, context=a.context, stride=stride, batch_size=a.batch_size,
                        progress=not a.no_progress)
    except ValueError as e:
        p.error(str(e))
    mean = float(nll.mean())
    result: dict[str, Any] = {"model": what, "data": source, "tokens_scored": int(nll.size), "context": a.context,
                              "stride": stride, "nll": mean, "perplexity": math.exp(mean), "bits_per_token": mean / math.log(2)}
    if byte_level:
        result["bits_per_byte"] = result.pop("bits_per_token")
    print(json.dumps(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
