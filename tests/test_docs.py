"""The documentation tells the truth: every ``python -m jaxattn...`` command written in the Markdown files
parses with its module's command line (and train commands name registered models and valid
``--model-args``), every ``jaxattn.*`` name resolves, and every documented call binds to the real
signature with the documented defaults. Nothing is run: each command stops right after its arguments
are checked."""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "RESULTS.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]

# placeholders the prose uses for paths and numbers
PLACEHOLDERS = {"FOLDER": "/nonexistent/folder", "RUN": "/nonexistent/run", "OUT": "/nonexistent/out",
                "RUN_DIR": "/nonexistent/run", "OUT_DIR": "/nonexistent/out", "MODEL": "/nonexistent/model",
                "DATA": "/nonexistent/data", "IMAGES...": "/nonexistent/a.png", "K": "2", "F": "/tmp/x.json",
                "FILE": "/tmp/x.json", "<sweep>": "attention",
                "Qwen2-0.5B": "/nonexistent/Qwen2-0.5B"}  # a downloaded Hugging Face folder


def _split(text: str) -> tuple[list[str], str]:
    """The fenced code lines and the prose (with inline code) of a Markdown text."""
    code, prose, fenced = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced and code and code[-1].endswith("\\"):
            code[-1] = code[-1][:-1] + line  # a continued shell line
        else:
            (code if fenced else prose).append(line)
    return code, "\n".join(prose)


def _inline(prose: str) -> list[str]:
    """Inline code spans (they may wrap onto the next line)."""
    return [m.group(1).replace("\n", " ") for m in re.finditer(r"`([^`]+)`", prose)]


def documented_commands() -> list[tuple[str, str]]:
    out = []
    for f in DOCS:
        code, prose = _split(f.read_text())
        for kind, spans in (("code", code), ("inline", _inline(prose))):
            for s in spans:
                i = s.find("python -m jaxattn")
                if i >= 0:
                    out.append((f"{f.name} ({kind})", s[i:]))
    return out


def _argv(cmd: str) -> list[str] | None:
    """``cmd`` as an argv after the module (placeholders filled, ``[optional]`` groups opened), or None
    when it elides its arguments (``...``)."""
    cmd = re.sub(r"\[([^\]]*)\]", lambda m: "" if "..." in m.group(1) else m.group(1), cmd)
    cmd = re.sub(r"\{(\w+),[\w,]*\}", r"\1", cmd)  # a usage synopsis {a,b,c}: its first choice
    words = shlex.split(cmd, comments=True)
    if any(w == "..." for w in words[3:]) or words[2] == "jaxattn.bench" and words[3:] == ["..."]:
        return None
    return [PLACEHOLDERS.get(w, w) for w in words]


class _Parsed(Exception):
    pass


class _ParseError(Exception):
    pass


COMMANDS = sorted(set(documented_commands()), key=lambda c: (c[0], c[1]))


def test_the_docs_hold_commands():
    """The collector finds the commands (a broken regex would make the test below vacuous)."""
    names = {c.split()[2] for _, c in COMMANDS}
    assert len(COMMANDS) >= 40
    assert {"jaxattn.train", "jaxattn.bench", "jaxattn.export", "jaxattn.generate", "jaxattn.perplexity",
            "jaxattn.classify", "jaxattn.bench.report", "jaxattn.train.moh_experiment"} <= names


@pytest.mark.parametrize("doc,cmd", COMMANDS, ids=[f"{d}:{c[18:60]}" for d, c in COMMANDS])
def test_documented_command_parses(doc, cmd, monkeypatch):
    argv = _argv(cmd)
    if argv is None:
        pytest.skip("arguments elided")
    module = argv[2]
    mod = importlib.import_module(module if module.rsplit(".", 1)[-1] not in ("train", "bench")
                                  else module + ".__main__")
    checked = {}

    if module == "jaxattn.train" and len(argv) > 3 and argv[3] in ("lm", "image"):
        # the train command builds its config and checks it; stop where training would begin
        task = importlib.import_module(f"jaxattn.train.{argv[3]}")

        def fake_train(cfg, **_):
            checked["cfg"] = cfg
            raise _Parsed

        monkeypatch.setattr(task, "train", fake_train)
    else:
        real = argparse.ArgumentParser.parse_args

        def parse_args(self, args=None, namespace=None):
            ns = real(self, args, namespace)
            if self.prog.split()[:3] == ["python", "-m", module] or not self.prog.startswith("python -m"):
                checked["ns"] = ns
                raise _Parsed
            return ns

        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)

    def error(self, message):
        raise _ParseError(message)

    monkeypatch.setattr(argparse.ArgumentParser, "error", error)
    try:
        rc = mod.main(argv[3:])
    except _Parsed:
        rc = None
    except _ParseError as e:
        # prose may name a command without its required arguments (`python -m jaxattn.bench tune`)
        if doc.endswith("(inline)") and str(e).startswith("the following arguments are required"):
            return
        raise AssertionError(f"{doc}: `{cmd}` does not parse: {e}") from None
    except SystemExit as e:  # --help
        assert e.code == 0, f"{doc}: `{cmd}` exited {e.code}"
        return
    assert checked, f"{doc}: `{cmd}` returned {rc} without parsing its arguments"
    cfg = checked.get("cfg")
    if cfg is not None and not cfg.model.startswith("/nonexistent"):
        from jaxattn.models.registry import check_model_kind

        check_model_kind(cfg.model, argv[3])  # a registered model of the task's kind
        if argv[3] == "lm":
            from jaxattn.train.lm import model_overrides

            model_overrides(cfg)
        else:
            from jaxattn.train.image import check_model

            check_model(cfg)


def test_a_wrong_flag_fails_the_command_check(monkeypatch):
    """The check above can fail: a misspelt flag and an unknown model are caught."""
    with pytest.raises(AssertionError, match="does not parse"):
        test_documented_command_parses("x", "python -m jaxattn.train lm --modle tnl-tiny", monkeypatch)
    with pytest.raises(ValueError):
        test_documented_command_parses("x", "python -m jaxattn.train lm --model tnl-nope", monkeypatch)
    with pytest.raises(ValueError):
        test_documented_command_parses("x", 'python -m jaxattn.train image --model vit-tiny --model-args "nope=1"',
                                       monkeypatch)
    with pytest.raises(AssertionError, match="does not parse"):
        test_documented_command_parses("x", "python -m jaxattn.bench attention --sequence 8", monkeypatch)


# ---- Python names and calls -------------------------------------------------------------------------

def _resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            obj = getattr(obj, p)  # AttributeError: a documented name that does not exist
        return obj
    raise ImportError(dotted)


def documented_names() -> list[tuple[str, str]]:
    """``jaxattn.*`` names in the Markdown files and in the source's docstrings and comments."""
    names = set()
    sources = [p for d in ("jaxattn", "pallas", "train") for p in sorted((ROOT / d).rglob("*.py"))]
    for f in [*DOCS, *sources]:
        text = f.read_text()
        for m in re.finditer(r"(?<![\w./-])(jaxattn(?:\.[A-Za-z_]\w*)+)", text):
            name = m.group(1)
            if text[m.end():m.end() + 3] in (".py", ".md") or name.endswith(("_experiment", ".bench.report")):
                continue
            names.add((str(f.relative_to(ROOT)), name))
    return sorted(names)


NAMES = documented_names()


def test_documented_names_resolve():
    assert len(NAMES) >= 300
    missing = []
    for doc, name in NAMES:
        try:
            _resolve(name)
        except (ImportError, AttributeError) as e:
            missing.append(f"{doc}: {name} ({type(e).__name__}: {e})")
    assert not missing, "documented names that do not exist:\n" + "\n".join(missing)


ALIASES = {"hf": "jaxattn.models.hf", "create_model": "jaxattn.models.create_model", "gpt": None, "model": None}


def _calls(source: str) -> list[ast.Call]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _dotted(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    head = node.id
    if head != "jaxattn":
        head = ALIASES.get(head)
        if head is None:
            return None
    return ".".join([head, *reversed(parts)])


def documented_calls() -> list[tuple[str, str, ast.Call]]:
    calls = []
    for f in DOCS:
        text = f.read_text()
        blocks = re.findall(r"```python\n(.*?)```", text, re.S)
        _, prose = _split(text)
        for kind, sources in (("code", blocks), ("inline", [s for s in _inline(prose) if "(" in s])):
            for src in sources:
                for call in _calls(src):
                    name = _dotted(call.func)
                    if name is not None:
                        calls.append((f"{f.name} ({kind})", name, call))
    return calls


def _bind_errors(calls) -> list[str]:
    bad = []
    for doc, name, call in calls:
        try:
            sig = inspect.signature(_resolve(name))
        except (TypeError, ValueError):
            continue

        def elided(a):
            return isinstance(a, ast.Starred) or isinstance(a, ast.Constant) and a.value is Ellipsis

        args = [None] * sum(not elided(a) for a in call.args)
        kwargs = {k.arg: None for k in call.keywords if k.arg is not None}
        # prose names a call by a few of its arguments (`jaxattn.attention(mask=bool)`), as does `...`
        partial = doc.endswith("(inline)") or any(map(elided, call.args))
        try:
            (sig.bind_partial if partial else sig.bind)(*args, **kwargs)
        except TypeError as e:
            bad.append(f"{doc}: {ast.unparse(call)} -> {e}")
    return bad


def test_documented_calls_bind():
    calls = documented_calls()
    assert len(calls) >= 20
    bad = _bind_errors(calls)
    assert not bad, "documented calls that do not match the signature:\n" + "\n".join(bad)


def test_the_name_and_call_checks_can_fail():
    with pytest.raises(AttributeError):
        _resolve("jaxattn.attention_nope")
    call = _calls("jaxattn.attention(q, k, v, causl=True)")[0]
    assert _bind_errors([("x (code)", _dotted(call.func), call)])
    call = _calls("hf.load_pretrained()")[0]
    assert _bind_errors([("x (code)", _dotted(call.func), call)])
    call = _calls("jaxattn.attention(..., causal=True)")[0]
    assert not _bind_errors([("x (code)", _dotted(call.func), call)])


def documented_signatures() -> list[tuple[str, str, str]]:
    """Inline spans that spell out a signature with keyword-only defaults: ``jaxattn.f(a, *, b=1, ...)``."""
    sigs = []
    for f in DOCS:
        _, prose = _split(f.read_text())
        for s in _inline(prose):
            m = re.fullmatch(r"(jaxattn[\w.]*)\((.*\*,.*)\)", s.strip())
            if m:
                sigs.append((f.name, m.group(1), m.group(2)))
    return sigs


def test_documented_signatures_match():
    """Parameters and defaults written in the docs are the real ones; a signature written without ``...``
    lists every parameter."""
    sigs = documented_signatures()
    assert any(name == "jaxattn.attention" for _, name, _ in sigs)
    bad = []
    for doc, name, params in sigs:
        real = inspect.signature(_resolve(name)).parameters
        complete = "..." not in params
        tree = ast.parse(f"def f({params.replace('...', '_ellipsis_=None')}): pass").body[0].args
        written = [*tree.posonlyargs, *tree.args, *tree.kwonlyargs]
        defaults = dict(zip([a.arg for a in [*tree.posonlyargs, *tree.args]][::-1], tree.defaults[::-1]))
        defaults.update({a.arg: d for a, d in zip(tree.kwonlyargs, tree.kw_defaults) if d is not None})
        for a in written:
            if a.arg in ("_ellipsis_",):
                continue
            if a.arg not in real:
                bad.append(f"{doc}: {name} documents a parameter {a.arg!r} it does not have")
                continue
            if a.arg in defaults:
                want = ast.literal_eval(defaults[a.arg])
                if real[a.arg].default != want:
                    bad.append(f"{doc}: {name}({a.arg}={want!r}) but the default is {real[a.arg].default!r}")
        if complete:
            names = {a.arg for a in written}
            extra = [p for p, v in real.items() if p not in names and not p.startswith("_")
                     and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)]
            if extra:
                bad.append(f"{doc}: {name}'s documented signature omits {extra}")
    assert not bad, "\n".join(bad)
