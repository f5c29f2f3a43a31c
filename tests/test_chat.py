"""Chat templates: a folder's Jinja template rendered and tokenized as transformers' apply_chat_template."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

pytest.importorskip("jinja2")
tokenizers = pytest.importorskip("tokenizers")

from jaxattn.models import chat  # noqa: E402

# Qwen2's ChatML template (a default system turn when the chat has none)
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama 3's shape: bos_token from the folder, whitespace-controlled blocks, raise_exception
LLAMA3 = """{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('roles must be system, user or assistant') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
SPECIAL = ["<|begin_of_text|>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
WORDS = ["<unk>", "system", "user", "assistant", "You", "are", "a", "helpful", ".", "hi", "there", "how", "?"]


def _folder(tmp_path, template, *, where="tokenizer_config"):
    from tokenizers import models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(WORDS)}
    tk = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(SPECIAL)  # ids len(WORDS) + i
    tk.save(str(tmp_path / "tokenizer.json"))
    conf = {"bos_token": {"content": "<|begin_of_text|>", "special": True}, "eos_token": "<|eot_id|>"}
    if where == "tokenizer_config":
        conf["chat_template"] = template
    elif where == "list":
        conf["chat_template"] = [{"name": "default", "template": template}, {"name": "tool_use", "template": "x"}]
    else:
        (tmp_path / "chat_template.jinja").write_text(template)
        conf["chat_template"] = "ignored: the .jinja file wins"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(conf))
    return tmp_path


def _id(token):
    return len(WORDS) + SPECIAL.index(token) if token in SPECIAL else WORDS.index(token)


def test_chatml_renders_and_tokenizes(tmp_path):
    folder = _folder(tmp_path, CHATML)
    msgs = [{"role": "user", "content": "hi there"}]
    text = chat.render_chat(chat.chat_template(folder), msgs)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n")
    assert not chat.render_chat(CHATML, msgs, add_generation_prompt=False).endswith("assistant\n")
    want = ["<|im_start|>", "system", "You", "are", "a", "helpful", "assistant", ".", "<|im_end|>",
            "<|im_start|>", "user", "hi", "there", "<|im_end|>", "<|im_start|>", "assistant"]
    np.testing.assert_array_equal(chat.encode_chat(folder, msgs), [_id(t) for t in want])
    # a system turn of the chat's own replaces the default one
    sys_text = chat.render_chat(CHATML, [{"role": "system", "content": "x"}, *msgs])
    assert sys_text.startswith("<|im_start|>system\nx<|im_end|>\n") and "helpful" not in sys_text


@pytest.mark.parametrize("where", ["tokenizer_config", "list", "jinja_file"])
def test_llama3_template_with_bos_from_the_folder(tmp_path, where):
    folder = _folder(tmp_path, LLAMA3, where=where)
    assert chat.template_variables(folder) == {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    msgs = [{"role": "system", "content": "a helpful"}, {"role": "user", "content": " how ? "}]
    ids = chat.encode_chat(folder, msgs)
    want = ["<|begin_of_text|>", "<|start_header_id|>", "system", "<|end_header_id|>", "a", "helpful", "<|eot_id|>",
            "<|start_header_id|>", "user", "<|end_header_id|>", "how", "?", "<|eot_id|>",
            "<|start_header_id|>", "assistant", "<|end_header_id|>"]
    np.testing.assert_array_equal(ids, [_id(t) for t in want])  # one BOS: the template's, none added
    with pytest.raises(ValueError, match="roles must be system, user or assistant"):
        chat.encode_chat(folder, [{"role": "tool", "content": "x"}])


def test_errors_name_what_is_missing(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="no chat template"):
        chat.chat_template(tmp_path)
    folder = _folder(tmp_path, CHATML, where="list")
    with pytest.raises(ValueError, match=r"no chat template named 'nope' \(it has \['default', 'tool_use'\]\)"):
        chat.chat_template(folder, "nope")
    assert chat.chat_template(folder, "tool_use") == "x"
    for bad in ("hi", [], [{"role": "user"}], [{"role": "bot", "content": "x"}], [{"role": "user", "content": 3}]):
        with pytest.raises(ValueError, match="messages"):
            chat.render_chat(CHATML, bad)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json"):
        chat.encode_chat(folder, [{"role": "user", "content": "hi"}])


def test_sandbox_and_helpers():
    out = chat.render_chat("{{ messages | tojson }}|{% generation %}{{ add_generation_prompt }}{% endgeneration %}"
                           "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}",
                           [{"role": "user", "content": "é"}, {"role": "assistant", "content": "b"}])
    assert out == '[{"role": "user", "content": "é"}, {"role": "assistant", "content": "b"}]|Trueuser'
    with pytest.raises(Exception, match="unsafe|not safely|access"):  # the sandbox: no attribute escapes
        chat.render_chat("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}",
                         [{"role": "user", "content": "x"}])


def test_matches_transformers_apply_chat_template(tmp_path):
    transformers = pytest.importorskip("transformers")
    for i, template in enumerate((CHATML, LLAMA3)):
        (tmp_path / str(i)).mkdir()
        folder = _folder(tmp_path / str(i), template)
        tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                                   bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
        tok.chat_template = template
        msgs = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "how ?"},
                {"role": "user", "content": "a"}]
        want = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        np.testing.assert_array_equal(chat.encode_chat(folder, msgs), want)


@pytest.mark.slow  # (a whole-model CLI run, 22 s; the templates are the other tests', the generate CLI test_train_lm's)
def test_generate_cli_chat_prints_the_greedy_reply(tmp_path, capsys, monkeypatch):
    """``generate --chat --system ... --prompt ...``: the folder's template around the turns, greedy decoding
    (checked against argmax over the parallel forward, step by step), the reply printed alone."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxattn.generate import main
    from jaxattn.models import generate
    from jaxattn.models.gpt import GPT, GPTConfig
    from jaxattn.models.hf import save_pretrained

    vocab = len(WORDS) + len(SPECIAL)
    model = GPT(GPTConfig(vocab_size=vocab, dim=32, layers=1, heads=2, mlp_dim=32, tie_embeddings=False,
                          attn_impl="xla", init_std=0.5), rngs=nnx.Rngs(3))
    folder = _folder(tmp_path, CHATML)
    save_pretrained(model, folder)
    msgs = [{"role": "system", "content": "a helpful"}, {"role": "user", "content": "hi there ?"}]
    ids = list(chat.encode_chat(folder, msgs))
    assert ids[:2] == [_id("<|im_start|>"), _id("system")] and ids[-1] == _id("assistant")
    reply = []
    for _ in range(3):  # (no end-of-sequence id in this folder: all 3 steps)
        nxt = int(jnp.argmax(model(jnp.asarray([ids + reply]))[0, -1]))
        reply.append(nxt)
    assert main(["--checkpoint", str(folder), "--chat", "--system", "a helpful", "--prompt", "hi there ?",
                 "--temperature", "0", "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out.strip()
    assert any(i < len(WORDS) for i in reply), reply  # (something to print: the check below can fail)
    assert printed == " ".join(WORDS[i] for i in reply if i < len(WORDS))  # (special tokens not printed)
    assert main(["--checkpoint", str(folder), "--chat", "--system", "a helpful", "--prompt", "hi there ?",
                 "--temperature", "0", "--max-new-tokens", "3", "--stream"]) == 0
    assert capsys.readouterr().out.strip() == printed  # (streamed: the same reply)
    for argv, match in [(["--chat"], "--chat takes the user's turn as --prompt"),
                        (["--system", "x", "--prompt", "hi"], "--system, --interactive and --chat-template need --chat"),
                        (["--interactive"], "--system, --interactive and --chat-template need --chat"),
                        (["--chat", "--prompt", "hi", "--chat-template", "nope"], "no chat template named 'nope'")]:
        with pytest.raises(SystemExit):
            main(["--checkpoint", str(folder), *argv])
        assert match in capsys.readouterr().err
    # --interactive: turns from standard input, each answered with the conversation so far (replies kept)
    monkeypatch.setattr("sys.stdin", io.StringIO("how ?\nhi\n\nnot read\n"))
    assert main(["--checkpoint", str(folder), "--chat", "--prompt", "hi there ?", "--interactive",
                 "--temperature", "0", "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    turns, want = [], []
    for text in ("hi there ?", "how ?", "hi"):
        turns.append({"role": "user", "content": text})
        ids = chat.encode_chat(folder, turns)  # (greedy decoding itself: checked above and in test_gpt.py)
        reply = np.asarray(generate(model, jnp.asarray(ids)[None], 3, temperature=0.0)[0])[ids.size:]
        want.append(" ".join(WORDS[i] for i in reply if i < len(WORDS)))
        turns.append({"role": "assistant", "content": want[-1]})
    assert printed == want and len(set(want)) > 1
