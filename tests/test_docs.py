"""The documentation is usable as written: every flag of every script has help text that says its
default, and every shell example in README.md and docs/*.md names a script that exists and flags
that script's parser knows, run with `uv run python` (the environment is uv's .venv)."""
import argparse
import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from unittest import mock

import pytest
from conftest import ROOT

SCRIPTS = ["delt.py", "infer_ufc.py", "d4m.py", "vlcp.py", "dmkd.py", "validate_fkd.py",
           "scripts/bench_train.py", "scripts/digits_results.py", "scripts/time_quickstart.py", "scripts/ddranking_check.py",
           "tests/tiny_models.py"]
DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


class _Parsed(Exception):
    pass


def parser_of(script):
    """The script's real ArgumentParser: run its main() until it parses, and stop there."""
    captured = {}

    def stop(self, args=None, namespace=None):
        captured["parser"] = self
        raise _Parsed

    name = "docs_" + re.sub(r"\W", "_", script)
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop):
        with pytest.raises(_Parsed):
            module.main([]) if "argv" in module.main.__code__.co_varnames else module.main()
    return captured["parser"]


_PARSERS = {}


def cached_parser(script):
    if script not in _PARSERS:
        _PARSERS[script] = parser_of(script)
    return _PARSERS[script]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help_and_its_default(script):
    p = cached_parser(script)
    for a in p._actions:
        if a.dest == "help":
            continue
        assert a.help and a.help.strip() and a.help != argparse.SUPPRESS, f"{script} {a.option_strings}: no help"
        if isinstance(a, argparse._StoreAction) and a.option_strings and a.default is not None:
            assert "default" in a.help.lower(), f"{script} {a.option_strings[0]}: help does not state the default"
    p.formatter_class = argparse.HelpFormatter
    assert "%" not in p.format_help().replace("%%", "")  # formats without a stray % placeholder


def shell_commands(text):
    """Commands of the ```bash blocks, continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S):
        block = re.sub(r"\\\n\s*", " ", block)
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                out += [c.strip() for c in re.split(r"&&|;|\|\|", line) if c.strip()]
    return out


def examples():
    found = []
    for doc in DOCS:
        for cmd in shell_commands(open(doc).read()):
            found.append((os.path.basename(doc), cmd))
    return found


def test_docs_have_examples_for_every_method():
    assert os.path.isfile(DOCS[0])
    text = " ".join(c for _, c in examples())
    for script in SCRIPTS[:6]:
        assert f"uv run python {script}" in text, script


@pytest.mark.parametrize("doc,cmd", examples(), ids=lambda v: v[:60] if isinstance(v, str) else None)
def test_every_shell_example_names_a_real_script_and_real_flags(doc, cmd):
    tokens = shlex.split(cmd.replace("$(", "").replace(")", ""), posix=True)
    tokens = [t for t in tokens if not re.fullmatch(r"[A-Z_]+=\S*", t)]  # leading VAR=value
    if not tokens or tokens[0] in ("for", "do", "done", "export", "cd", "git", "du", "pip", "time", "ls", "curl"):
        return
    assert tokens[0] != "python", f"{doc}: bare python (the environment is uv's .venv): {cmd}"
    if tokens[0] == "bash":
        assert os.path.isfile(os.path.join(ROOT, tokens[1])), f"{doc}: no such script {tokens[1]}"
        return
    if tokens[:3] == ["uv", "run", "python"] and tokens[3:5] == ["-m", "tests.tiny_models"]:
        script, rest = "tests/tiny_models.py", tokens[5:]
    elif tokens[:3] == ["uv", "run", "python"] and len(tokens) > 3 and tokens[3].endswith(".py"):
        script, rest = tokens[3], tokens[4:]
    elif tokens[:2] == ["uv", "run"] and tokens[2] in ("torchrun", "pytest"):
        if tokens[2] == "pytest":
            return
        script = next(t for t in tokens if t.endswith(".py"))
        rest = tokens[tokens.index(script) + 1:]
    elif tokens[0] == "uv":  # uv sync, uv run pytest, ...
        return
    else:
        pytest.fail(f"{doc}: unexpected command form (use `uv run python SCRIPT`): {cmd}")
    assert os.path.isfile(os.path.join(ROOT, script)), f"{doc}: no such script {script}"
    known = cached_parser(script)._option_string_actions
    for t in rest:
        if t.startswith("--"):
            assert t.split("=")[0] in known, f"{doc}: {script} has no flag {t}: {cmd}"


def test_help_loads_no_torchvision_and_no_generator_library():
    """`<script> --help` and argument errors pay for torch's import only: torchvision (which pulls in
    torch._dynamo), diffusers, transformers and scikit-learn are imported where they are first used."""
    heavy = ("torchvision", "diffusers", "transformers", "sklearn", "timm")
    for script in SCRIPTS[:6]:
        code = (f"import runpy, sys; sys.argv = [{script!r}, '--help']\n"
                f"try: runpy.run_path({script!r}, run_name='__main__')\n"
                f"except SystemExit: pass\n"
                f"print('LOADED', sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))")
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip().splitlines()[-1] == "LOADED []", (script, proc.stdout[-500:])
