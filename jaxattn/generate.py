"""``python -m jaxattn.generate --checkpoint DIR --prompt "..."``: sample from a trained LM: text for
byte-level runs, or token ids (``--prompt-ids 1,2,3``) for runs on token files. ``DIR`` may also be a
Hugging Face model folder jaxattn converts (TransNormerLLM, LLaMA, Qwen2: ``config.json`` + weights,
downloaded beforehand); text prompts there need its tokenizer's library (``sentencepiece`` for a
``tokenizer.model``, ``tokenizers`` for a ``tokenizer.json``). ``--chat`` sends the prompt as a user turn in
the folder's own chat format (its Jinja chat template; ``jinja2`` and ``tokenizers``) and prints the reply."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def load_trained(run_dir: str | Path, *, ema: bool = False):
    """Rebuilds the model from ``DIR/config.json`` and restores the latest checkpoint: ``(model,
    LMConfig, step, byte_level)`` (``byte_level``: the run's tokens are bytes, not a token file's ids;
    ``ema``: the weights' moving average of a run trained with ``--ema-decay``)."""
    from jaxattn.train.lm import LMConfig, Trainer, _manager, default_model_factory

    run_dir = Path(run_dir)
    conf_path = run_dir / "config.json"
    if not conf_path.exists():
        raise ValueError(f"--checkpoint {run_dir}: no config.json (is it a training --out folder?)")
    raw = json.loads(conf_path.read_text())
    vocab = raw.pop("vocab_size")
    raw.pop("source", None)
    byte_level = raw.pop("byte_level", vocab == 256)  # (runs before the field: byte-level iff 256 ids)
    cfg = LMConfig(**{k: v for k, v in raw.items() if k in LMConfig.__dataclass_fields__})
    cfg.vocab_size = vocab
    cfg.seq_parallel = 1  # sampling runs on one device
    trainer = Trainer(cfg, default_model_factory(cfg, vocab), devices=jax.local_devices()[:1])
    manager = _manager(run_dir)
    step = manager.latest_step()
    if step is None:
        raise ValueError(f"--checkpoint {run_dir}: no checkpoint found in {run_dir / 'checkpoints'}")
    trainer.restore(manager, step)
    if ema and not trainer.has_ema:
        raise ValueError(f"{run_dir}: the run kept no EMA weights (train it with --ema-decay)")
    return (trainer.ema_model if ema else trainer.model), cfg, int(step), bool(byte_level)


def load_language_model(path: str | Path, *, dtype: str | None = None, model_args: str | None = None,
                        ema: bool = False, flag: str = "--checkpoint", adapter: str | Path | None = None):
    """``(model, tokenizer or None, byte_level, the run's LMConfig or None, description)`` of a Hugging Face
    folder (``dtype``: its compute and parameter dtype; ``model_args``: its config fields, ``key=value ...``;
    ``adapter``: a PEFT LoRA adapter folder folded into its weights) or of an lm training run (``ema``: the
    weights' moving average)."""
    from jaxattn.models import hf

    kind = hf.hf_model_type(path)
    if kind == "timm":
        raise ValueError(f"{flag} {path} is a timm image model, not a language model".lstrip())
    if kind is None:
        if adapter is not None:
            raise ValueError(f"--adapter (a PEFT LoRA adapter) applies to Hugging Face folders; {path} is a training "
                             "run (train with --lora-rank: its adapters are part of the run)")
        model, cfg, step, byte_level = load_trained(path, ema=ema)
        return model, None, byte_level, cfg, f"{cfg.model}, step {step}"
    from jaxattn.train.loop import parse_model_args

    extra = parse_model_args(model_args, hf.read_config(path))
    if dtype:
        extra.update(dtype=dtype, param_dtype=dtype)
    what = f"{kind} {Path(path).name}" + (f" + adapter {Path(adapter).name}" if adapter is not None else "")
    return hf.load_pretrained(path, adapter=adapter, **extra), hf.load_tokenizer(path), False, None, what


def _ids(text: str, vocab: int) -> np.ndarray:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--prompt-ids must be integers separated by commas or spaces, got {text!r}") from None
    if not ids or min(ids) < 0 or max(ids) >= vocab:
        raise ValueError(f"--prompt-ids must be one or more ids in [0, {vocab}), got {text!r}")
    return np.asarray(ids, np.int32)


def folder_eos_ids(folder: Path, vocab: int) -> list[int]:
    """A Hugging Face folder's end-of-sequence ids, as transformers' ``generate`` takes them:
    ``generation_config.json``'s, else ``config.json``'s (or its ``text_config``'s); a list may hold several
    (chat models end a turn with one of them)."""
    eos = None
    gen = folder / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
    if eos is None:
        raw = json.loads((folder / "config.json").read_text())
        eos = raw.get("eos_token_id", (raw.get("text_config") or {}).get("eos_token_id"))
    return [e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int) and 0 <= e < vocab]


class Streamer:
    """Prints a sequence's text as its tokens arrive: each time, what the decoded text adds (held back while
    it ends in an unfinished character); :meth:`finish` prints the rest and the newline, so the output is
    the final text, as without streaming."""

    def __init__(self, decode, ids: list[int] | None = None, out=None):
        self.decode, self.ids, self.out, self.printed = decode, list(ids or []), out or sys.stdout, ""
        self._show(self.decode(self.ids))

    def _show(self, text: str) -> None:
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text

    def add(self, token: int) -> None:
        self.ids.append(token)
        self._show(self.decode(self.ids))

    def finish(self, ids: list[int] | None = None) -> None:
        text = self.decode(self.ids if ids is None else ids)
        self.out.write((text[len(self.printed):] if text.startswith(self.printed) else "\n" + text) + "\n")
        self.out.flush()


def _chat(p: argparse.ArgumentParser, a: argparse.Namespace, sample, vocab: int) -> None:
    """``--chat``: each user turn (``--prompt``, then standard input with ``--interactive``) in the folder's
    chat format, the reply printed alone (its end-of-turn token, a special token, left out) and kept."""
    from jaxattn.models import chat

    turns = [{"role": "system", "content": a.system}] if a.system is not None else []
    pending = [a.prompt] if a.prompt is not None else []
    for turn in itertools.count():
        if pending:
            text = pending.pop()
        elif a.interactive:
            try:
                text = input("> " if sys.stdin.isatty() else "")
            except EOFError:
                break
            if not text.strip():
                break
        else:
            break
        turns.append({"role": "user", "content": text})
        try:
            prompt = chat.encode_chat(a.checkpoint, turns, template=a.chat_template)
        except (ValueError, ImportError) as e:
            p.error(str(e))
        if prompt.size and prompt.max() >= vocab:
            p.error(f"the chat prompt has token ids past the model's vocabulary ({vocab})")
        key = jax.random.PRNGKey(a.seed)
        stream = Streamer(lambda ids: chat.decode_reply(a.checkpoint, ids)) if a.stream else None
        out = sample(prompt, jax.random.fold_in(key, turn) if turn else key, stream)
        reply = chat.decode_reply(a.checkpoint, out[prompt.size:])
        if stream is None:
            print(reply, flush=True)
        else:
            stream.finish(out[prompt.size:].tolist())
        turns.append({"role": "assistant", "content": reply})


def _decoder(tokenizer, byte_level: bool):
    """Token ids -> text: bytes, the folder's tokenizer, or the ids themselves."""
    if byte_level:
        return lambda ids: bytes(np.asarray(ids).clip(0, 255).astype(np.uint8)).decode("utf-8", errors="replace")
    if tokenizer is not None:
        return tokenizer.decode
    return lambda ids: " ".join(map(str, np.asarray(ids).tolist()))


def _batch(p: argparse.ArgumentParser, a: argparse.Namespace, model, tokenizer, byte_level: bool, vocab: int,
           eos, what: str) -> int:
    """``--prompts-file``: every line's prompt sampled in one batch (ragged lengths: ``prompt_lengths``), each
    printed as it would be alone (up to its end-of-sequence token), a blank line between them."""
    from jaxattn.models import generate

    path = Path(a.prompts_file)
    if not path.is_file():
        p.error(f"--prompts-file {path}: no such file")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        p.error(f"--prompts-file {path}: no prompts (one per line)")
    try:
        if byte_level:
            prompts = [np.frombuffer(line.encode(), np.uint8).astype(np.int32) for line in lines]
        elif tokenizer is not None:
            prompts = [np.asarray(tokenizer.encode(line), np.int32) for line in lines]
        else:
            prompts = [_ids(line, vocab) for line in lines]
    except ValueError as e:
        p.error(f"--prompts-file {path}: {e}")
    if not all(x.size for x in prompts):
        p.error(f"--prompts-file {path}: a line encodes to no tokens")
    lengths = [x.size for x in prompts]
    padded = np.zeros((len(prompts), max(lengths)), np.int32)
    for row, x in zip(padded, prompts):
        row[:x.size] = x
    try:
        out = generate(model, jnp.asarray(padded), a.max_new_tokens, temperature=a.temperature,
                       top_k=min(a.top_k, vocab) or None, top_p=a.top_p, min_p=a.min_p,
                       repetition_penalty=a.repetition_penalty, eos_id=eos, key=jax.random.PRNGKey(a.seed),
                       prompt_lengths=lengths)
    except ValueError as e:
        p.error(str(e))
    out = np.asarray(out)
    stops = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    decode = _decoder(tokenizer, byte_level)
    texts = []
    for row, n in zip(out, lengths):
        new = row[n:n + a.max_new_tokens].tolist()
        hit = next((i for i, t in enumerate(new) if t in stops), None)  # (the rest repeats the first eos)
        texts.append(decode(row[:n].tolist() + (new if hit is None else new[:hit + 1])))
    print("\n\n".join(texts))
    print(f"[{what}; {len(prompts)} prompts]", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from jaxattn.models import generate

    p = argparse.ArgumentParser(prog="python -m jaxattn.generate", description=__doc__)
    p.add_argument("--checkpoint", required=True,
                   help="a training --out folder, or a Hugging Face TransNormerLLM / LLaMA / Qwen2 folder")
    p.add_argument("--prompt", default=None, help='text, for byte-level runs (default "def ")')
    p.add_argument("--prompt-ids", default=None, help="token ids such as 464,2068 (runs on token files)")
    p.add_argument("--prompts-file", default=None, help="a batch of prompts, one per line (text, or token ids for "
                   "runs on token files), sampled together (ragged lengths) and printed in order, a blank line "
                   "between them")
    p.add_argument("--chat", action="store_true", help="a Hugging Face chat model's folder: --prompt is a user "
                   "turn, formatted by the folder's chat template; prints the assistant's reply only")
    p.add_argument("--system", default=None, help="with --chat: a system turn before the prompt")
    p.add_argument("--chat-template", default=None, help="with --chat: which of the folder's named chat templates "
                   "(e.g. tool_use; default: its default one)")
    p.add_argument("--interactive", action="store_true", help="with --chat: a conversation, each line of standard "
                   "input a user turn (after --prompt, if given) answered in turn, the replies kept in the chat; "
                   "an empty line or the end of input ends it")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40, help="0: no top-k cut (a cut past the vocabulary keeps it whole)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the most likely tokens "
                   "whose probability reaches this")
    p.add_argument("--min-p", type=float, default=None, help="min-p sampling: keep the tokens at least this times "
                   "as likely as the most likely one")
    p.add_argument("--repetition-penalty", type=float, default=None, help="divide (multiply, if negative) the "
                   "logits of tokens already in the text by this (e.g. 1.2; 1: none)")
    p.add_argument("--eos-id", type=int, default=None, help="stop at this token id (default: a Hugging Face "
                   "folder's eos_token_id; none for training runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter folder (adapter_config.json + "
                   "adapter_model.safetensors) folded into a Hugging Face folder's weights")
    p.add_argument("--ema", action="store_true", help="a run's moving average of the weights (--ema-decay)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="a Hugging Face folder's model in this dtype, compute and parameters (bfloat16: half "
                   "the memory of float32 parameters; default float32)")
    a = p.parse_args(argv)
    if a.prompt is not None and a.prompt_ids is not None:
        p.error("give --prompt (text) or --prompt-ids (token ids), not both")
    if a.prompts_file is not None and (a.prompt is not None or a.prompt_ids is not None or a.chat or a.stream):
        p.error("--prompts-file holds the prompts: not with --prompt, --prompt-ids, --chat or --stream")
    if a.chat and a.prompt_ids is not None or a.chat and a.prompt is None and not a.interactive:
        p.error("--chat takes the user's turn as --prompt (text), or turns from standard input with --interactive")
    if (a.system is not None or a.interactive or a.chat_template is not None) and not a.chat:
        p.error("--system, --interactive and --chat-template need --chat")
    try:
        model, tokenizer, byte_level, run_cfg, what = load_language_model(a.checkpoint, dtype=a.dtype, ema=a.ema,
                                                                              adapter=a.adapter)
    except ValueError as e:
        p.error(str(e))
    folder = run_cfg is None  # a Hugging Face folder
    vocab = model.cfg.vocab_size
    eos = a.eos_id
    if eos is None and folder:
        eos = folder_eos_ids(Path(a.checkpoint), vocab) or None

    def sample(prompt: np.ndarray, key: jax.Array, stream: "Streamer | None" = None) -> np.ndarray:
        try:
            toks = generate(model, jnp.asarray(prompt)[None], a.max_new_tokens, temperature=a.temperature,
                            top_k=min(a.top_k, vocab) or None, top_p=a.top_p, min_p=a.min_p,
                            repetition_penalty=a.repetition_penalty, eos_id=eos, key=key,
                            on_token=None if stream is None else lambda t: stream.add(int(t[0])))
        except ValueError as e:
            p.error(str(e))
        return np.asarray(toks[0])

    if a.prompts_file is not None:
        return _batch(p, a, model, tokenizer, byte_level, vocab, eos, what)
    if a.chat:
        if not folder:
            p.error(f"--chat needs a Hugging Face chat model's folder; {a.checkpoint} is a training run")
        _chat(p, a, sample, vocab)
        print(f"[{what}]", file=sys.stderr)
        return 0
    if a.prompt_ids is not None:
        try:
            prompt = _ids(a.prompt_ids, vocab)
        except ValueError as e:
            p.error(str(e))
    elif tokenizer is not None:
        prompt = tokenizer.encode("The" if a.prompt is None else a.prompt)
        if not prompt.size:
            p.error("--prompt must not be empty")
    elif not byte_level:
        p.error(f"{a.checkpoint} was trained on token ids ({vocab} of them), not bytes: give the prompt as "
                "--prompt-ids 1,2,3 (ids of its tokenizer; a Hugging Face folder takes text when its "
                "tokenizer's library is installed)")
    else:
        text = "def " if a.prompt is None else a.prompt
        if not text:
            p.error("--prompt must not be empty")
        prompt = np.frombuffer(text.encode(), np.uint8).astype(np.int32)
    decode = _decoder(tokenizer, byte_level)
    stream = Streamer(decode, prompt.tolist()) if a.stream else None
    out = sample(prompt, jax.random.PRNGKey(a.seed), stream)
    if stream is None:
        print(decode(out))
    else:
        stream.finish(out.tolist())
    print(f"[{what}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
