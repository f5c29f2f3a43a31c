"""Chat prompts for Hugging Face folders: a conversation rendered with the folder's own Jinja chat
template and tokenized as transformers' ``apply_chat_template`` does (the special tokens the template
writes are parsed as tokens; no BOS is added beyond the template's own).

Needs ``jinja2`` (3.1 or newer) and, to tokenize, ``tokenizers`` with the folder's ``tokenizer.json``
(the ``hf`` extra installs both)."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["chat_template", "template_variables", "render_chat", "encode_chat", "decode_reply", "check_messages"]

ROLES = ("system", "user", "assistant", "tool", "developer")
# the special-token names transformers passes to every template (their text, e.g. bos_token="<s>")
_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def chat_template(folder: str | Path, name: str | None = None) -> str:
    """The folder's chat template, from where transformers looks, first found first: ``chat_template.jinja``,
    ``additional_chat_templates/NAME.jinja``, ``chat_template.json``, ``tokenizer_config.json``'s
    ``chat_template`` (a string, or a list of ``{"name", "template"}``). ``name`` picks one of several
    (default: the one named ``default``). Raises ``ValueError`` when the folder has none."""
    folder = Path(folder)
    named: dict[str, str] = {}
    if (folder / "chat_template.jinja").is_file():
        named["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        named.update({p.stem: p.read_text(encoding="utf-8") for p in sorted(extra.glob("*.jinja"))})
    if not named:
        raw = _read_json(folder / "chat_template.json").get("chat_template") \
            or _read_json(folder / "tokenizer_config.json").get("chat_template")
        if isinstance(raw, str):
            named["default"] = raw
        elif isinstance(raw, list):
            named.update({t["name"]: t["template"] for t in raw if isinstance(t, dict) and "name" in t})
    if not named:
        raise ValueError(f"{folder}: no chat template (chat_template.jinja, or tokenizer_config.json's "
                         "chat_template): a base model, not a chat model?")
    key = name or ("default" if "default" in named else None)
    if key not in named:
        raise ValueError(f"{folder}: no chat template named {key!r} (it has {sorted(named)})"
                         if name else f"{folder}: several chat templates {sorted(named)} and none named "
                         "'default': name one")
    return named[key]


def template_variables(folder: str | Path) -> dict[str, str]:
    """The special tokens' text a template sees (``bos_token``, ``eos_token``, ...), from
    ``special_tokens_map.json`` and ``tokenizer_config.json`` (the latter wins)."""
    folder = Path(folder)
    out = {}
    for source in (_read_json(folder / "special_tokens_map.json"), _read_json(folder / "tokenizer_config.json")):
        for key in _SPECIAL:
            value = source.get(key)
            if isinstance(value, dict):  # an AddedToken written out: {"content": "<s>", ...}
                value = value.get("content")
            if isinstance(value, str):
                out[key] = value
    return out


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` as plain dicts, each with a ``role`` among ``ROLES`` and string ``content``."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts, got "
                         f"{type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}] must be a dict with 'role' in {ROLES} and string 'content', got {m!r}")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def _environment():
    try:
        import jinja2
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat templates need jinja2: pip install 'jaxattn[hf]' (or jinja2>=3.1)") from None

    class Generation(Extension):
        """``{% generation %} ... {% endgeneration %}`` (transformers marks assistant tokens with it): the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # as transformers: a sandbox (templates come from model folders), block tags trimmed, loop controls
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                **variables: Any) -> str:
    """``template`` (Jinja) rendered for ``messages`` (``[{"role": "user", "content": "..."}, ...]``);
    ``add_generation_prompt`` appends the header of the assistant's turn; ``variables`` (``bos_token``,
    ``tools``, ``enable_thinking``, ...) reach the template as they are. A template's own
    ``raise_exception`` (e.g. roles out of order) raises ``ValueError``."""
    import jinja2

    messages = check_messages(messages)
    try:
        return _environment().from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template: {e}") from None


def encode_chat(folder: str | Path, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                template: str | None = None, **variables: Any) -> np.ndarray:
    """Token ids (int32) of ``messages`` in the folder's chat format: its template (``template``: one of
    several by name) rendered with its special tokens' text, then tokenized by its ``tokenizer.json``
    without adding special tokens, as transformers' ``apply_chat_template(..., tokenize=True)``."""
    folder = Path(folder)
    text = render_chat(chat_template(folder, template), messages, add_generation_prompt=add_generation_prompt,
                       **{**template_variables(folder), **variables})
    return np.asarray(_tokenizer(folder).encode(text, add_special_tokens=False).ids, np.int32)


def decode_reply(folder: str | Path, ids) -> str:
    """The text of a reply's token ids (special tokens, e.g. the end of the turn, left out)."""
    return _tokenizer(Path(folder)).decode([int(i) for i in ids], skip_special_tokens=True)


def _tokenizer(folder: Path):
    path = folder / "tokenizer.json"
    return _load_tokenizer(str(path), path.stat().st_mtime_ns if path.is_file() else None, folder)


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str, mtime: int | None, folder: Path):
    """(cached per file and modification time: a streamed reply decodes at every token)"""
    if mtime is None:
        raise ValueError(f"{folder}: chat prompts need the folder's tokenizer.json (tokenizers), which it lacks")
    try:
        import tokenizers
    except ImportError:
        raise ImportError("chat prompts need tokenizers: pip install 'jaxattn[hf]'") from None
    return tokenizers.Tokenizer.from_file(path)
