"""Every command in the README and docs/ still works as written.

The shell blocks (```bash) of README.md and docs/*.md are parsed into commands. For each one:
  * the program it runs exists (a script, a top-level entry point, a module of this package, a console command
    declared in pyproject.toml);
  * every flag it passes (`--cfg-path`, `--compare-ckpt`, ...) appears in that program's own `--help`;
  * every file of this repository it names (a recipe, an eval config, a script) exists;
and the cheap ones run to the end (`python -m minigpt4.eval.protocols`, the tiny full-size check, the meta-device
model summary). The rest need real weights, COCO or minutes of CPU, and are run by their own tests.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Commands run to the end here: cheap, and needing nothing but the checkout.
RUN_IN_FULL = {
    "python -m minigpt4.eval.protocols",
    "python scripts/model_summary.py --cfg-path train_configs/adavib_minigpt4_7b.yaml --device meta",
}
HELP_RUNNER = r"""
import contextlib, io, json, runpy, sys
outputs = {}
for target in sys.argv[1:]:
    buffer = io.StringIO()
    sys.argv = [target, "--help"]
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            if target.endswith(".py"):
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
        except SystemExit:
            pass
    outputs[target] = buffer.getvalue()
print(json.dumps(outputs))
"""


def documented_commands() -> list[tuple[str, str]]:
    """(doc file, command) for every command line of every bash block, continuation lines joined."""
    found = []
    for doc in DOC_FILES:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(encoding="utf-8"), re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                command = re.split(r"\s+#", line)[0].strip()
                if command and not command.startswith("#"):
                    found.append((doc.name, command))
    return found


def console_scripts() -> dict[str, str]:
    """adavib-* command -> the module whose main it runs (pyproject's [project.scripts])."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return {name: target.split(":")[0] for name, target in scripts.items()}


def program_of(command: str) -> tuple[str, list[str]] | None:
    """The Python program a command runs (a path relative to ROOT or a module name) and its arguments;
    None for commands that run no program of this repository (pip, free, bash scripts/...)."""
    words = shlex.split(command.split("&&")[-1])
    while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value prefixes
        words.pop(0)
    if not words:
        return None
    if words[0] == "torchrun":
        words = [w for w in words[1:] if not w.startswith("--")]
        return words[0], words[1:]
    if words[0] in ("python", "python3"):
        if words[1] == "-m":
            return words[2], words[3:]
        return words[1], words[2:]
    if words[0] in console_scripts():
        return console_scripts()[words[0]], words[1:]
    return None


COMMANDS = documented_commands()
PROGRAMS = sorted({program_of(c)[0] for _, c in COMMANDS if program_of(c)})


def test_the_docs_hold_commands_to_check():
    # A parser that found nothing would make every check below pass vacuously.
    assert len(COMMANDS) > 40 and len(PROGRAMS) > 10, (len(COMMANDS), PROGRAMS)


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_documented_program_exists(program):
    if program.endswith(".py"):
        assert (ROOT / program).is_file(), f"{program} is named in the docs but is not in the repository"
    else:
        assert (ROOT / Path(*program.split("."))).with_suffix(".py").is_file() or (
            ROOT / Path(*program.split(".")) / "__main__.py").is_file(), program


def test_bash_scripts_and_repository_files_named_in_the_docs_exist():
    missing = []
    for doc, command in COMMANDS:
        for word in shlex.split(command.replace("...", "")):
            word = word.split("=", 1)[-1]
            if re.match(r"^(scripts|train_configs|eval_configs|assets)/[\w./-]+$", word) and "*" not in word:
                if not (ROOT / word).exists():
                    missing.append(f"{doc}: {word} (in: {command[:80]})")
    assert not missing, "\n".join(missing)


@pytest.fixture(scope="module")
def help_texts() -> dict[str, str]:
    """Every documented program's --help, all in one Python process (a process each would cost a minute)."""
    targets = [str(ROOT / p) if p.endswith(".py") else p for p in PROGRAMS]
    done = subprocess.run([sys.executable, "-c", HELP_RUNNER, *targets], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = json.loads(done.stdout.strip().splitlines()[-1])
    return {p: outputs[str(ROOT / p) if p.endswith(".py") else p] for p in PROGRAMS}


def test_every_flag_in_the_docs_is_one_its_program_accepts(help_texts):
    unknown = []
    for doc, command in COMMANDS:
        found = program_of(command)
        if not found:
            continue
        program, arguments = found
        assert "usage:" in help_texts[program], f"{program} --help printed no usage:\n{help_texts[program][-500:]}"
        for flag in (a.split("=")[0] for a in arguments if a.startswith("--")):
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_texts[program]):
                unknown.append(f"{doc}: {program} has no {flag} (in: {command[:90]})")
    assert not unknown, "\n".join(unknown)


@pytest.mark.parametrize("command", sorted(RUN_IN_FULL))
def test_the_cheap_documented_commands_run(command):
    assert any(c == command for _, c in COMMANDS), f"{command!r} is no longer in the docs: update RUN_IN_FULL"
    words = shlex.split(command)
    done = subprocess.run([sys.executable, *words[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip(), f"{command} printed nothing"
