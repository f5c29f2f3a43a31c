"""Repository contracts: the README's test command is the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert len(block) == 2, "README must open with exactly two commands"
    test_cmd = block[1].split("&&")[-1].strip()
    assert test_cmd.startswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci


def test_pyproject_lists_every_package():
    """Every folder with an ``__init__.py`` under the three source roots is installed (non-editable too)."""
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = cfg["package-dir"]
    listed = set(cfg["packages"])
    for pkg, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            name = ".".join([pkg, *rel.parts]) if rel.parts else pkg
            if any(p in dirs for p in [name]) and name != pkg:
                continue  # mapped separately (e.g. jaxattn.pallas)
            assert name in listed, f"{name} ({init.parent}) is missing from [tool.setuptools] packages"


def test_gpu_check_script_uses_valid_bench_flags():
    """``.ci/gpu`` (the one-call GPU check) is valid bash and every bench it runs parses with the
    bench CLI, so flag drift is caught on CPU before a session spends device time on it."""
    import shlex
    import subprocess

    from jaxattn.bench.__main__ import build_parser

    script = ROOT / ".ci" / "gpu"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    calls = [line.split("$B", 1)[1].split(";;")[0] for line in text.splitlines()
             if " part " in f" {line.strip()}" and "$B " in line]
    benches = {shlex.split(c)[0] for c in calls}
    assert benches >= {"attention", "lightning", "sage", "sparse", "halo", "vision", "tnl", "landmark", "decode"}
    for call in calls:
        args = [a.replace("$J", "/tmp").replace('"', "") for a in shlex.split(call)]
        build_parser().parse_args(args)  # SystemExit on an unknown flag
    # the two calls' part lists name only parts the script defines, and together run every bench
    arms = set(re.findall(r"^\s*([a-z0-9]+)\) part ", text, re.M))
    lists = re.findall(r"set -- ([a-z0-9 ]+);", text)
    assert len(lists) == 2 and all(set(lst.split()) <= arms for lst in lists)
    assert set(" ".join(lists).split()) >= benches | {"tests"}
    assert "jaxattn.bench.report" in text and "gpu-logs.tgz" in text


def test_gpu_tune_script_uses_valid_tune_flags():
    """``.ci/gpu-tune`` is valid bash and each ``tune`` line parses with the bench CLI (plus the
    ``--budget-s`` / ``--json`` its helper appends)."""
    import shlex
    import subprocess

    from jaxattn.bench.__main__ import build_parser

    script = ROOT / ".ci" / "gpu-tune"
    subprocess.run(["bash", "-n", str(script)], check=True)
    calls = [shlex.split(line)[3:] for line in script.read_text().splitlines() if line.startswith("tune ")]
    from jaxattn.bench.tune import FAMILIES

    assert {c[0] for c in calls} == set(FAMILIES)  # every tunable kernel
    for call in calls:
        args = build_parser().parse_args(["tune", *call, "--budget-s", "10", "--json", "/tmp/x.json"])
        assert args.family == call[0]
