"""Every `make <recipe>` command line is accepted by the kd- command it calls.

Recipes run for hours and are not run here; this catches the drift that would make one fail after an
hour of work: a renamed flag, a flag given to the wrong sub-command, a missing required option. Each
recipe is expanded with `make -n` (prerequisites included), every kd- invocation in it is cut out of
the shell text and parsed by that command's own click parser without running it.
"""

import re
import shlex
import shutil
import subprocess

import click
import pytest
import typer

from conftest import ROOT
from kdtools.cli._common import _typer_click_exceptions

MODULES = {"kd-aggregate": "aggregate", "kd-query": "query", "kd-serve": "serve", "kd-gen-queries": "gen_queries",
           "kd-distill": "distill", "kd-diffstep": "diffstep", "kd-eval": "eval"}
SEPARATORS = {"|", ";", "&&", "||", "&", ")", "(", "then", "fi", "do", "done"}


def recipes() -> list[str]:
    if shutil.which("make") is None:
        return []
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True).stdout
    line = next((l for l in out.splitlines() if l.startswith("recipes:")), "")
    return line.split()[1:]


def invocations(recipe: str) -> list[tuple[str, list[str]]]:
    """(command, argv) of every kd- call in `make -n RECIPE` (install steps skipped: they are not kd- calls)."""
    text = subprocess.run(["make", "-n", "-B", recipe], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "KD_DATA": "/nonexistent"}).stdout
    return kd_calls(text)


def kd_calls(text: str) -> list[tuple[str, list[str]]]:
    """(command, argv) of every kd- call in shell text (backslash-continued lines joined)."""
    text = text.replace("\\\n", " ")
    calls = []
    for line in text.splitlines():
        line = re.sub(r"(?<!\S)\d+(?=[<>])", " ", line)  # 2>/dev/null, 2>&1, 0<in: a descriptor number is no argument
        line = re.sub(r"-m\s+kdtools\.cli\.(\w+)", lambda m: "kd-" + m.group(1).replace("_", "-"), line)  # torchrun ... -m
        try:
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)  # ; | & ( ) < > as their own tokens
            lexer.whitespace_split = True
            lexer.commenters = "#"
            tokens = list(lexer)
        except ValueError:
            continue
        i = 0
        while i < len(tokens):
            tok = tokens[i].rsplit("/", 1)[-1]
            if tok in MODULES:
                argv = []
                for t in tokens[i + 1:]:
                    if t in SEPARATORS or t.startswith((">", "<")) or set(t) <= set(";|&()"):
                        break
                    argv.append(t)
                calls.append((tok, argv))
                i += 1 + len(argv)
            else:
                i += 1
    return calls


def parse_only(command: str, argv: list[str]) -> None:
    """Run click's parser (types, choices, required options, unknown flags) without calling the command."""
    import importlib

    module = importlib.import_module(f"kdtools.cli.{MODULES[command]}")
    app = module.app
    if command == "kd-aggregate" and argv[:1] == ["simulate"]:  # main() dispatches it to its own app
        app, argv = module.sim_app, argv[1:]
    cmd = typer.main.get_command(app)
    ctx = cmd.make_context(command, list(argv))
    def rest(ctx):  # what a group left for its sub-command (click keeps the name apart, as _protected_args)
        return [*getattr(ctx, "_protected_args", getattr(ctx, "protected_args", [])), *ctx.args]

    while hasattr(cmd, "list_commands") and rest(ctx):  # a (typer) group: parse its sub-command too
        name, *args = rest(ctx)
        sub = cmd.get_command(ctx, name)
        if sub is None:
            raise click.UsageError(f"{command}: no sub-command {name!r}")
        cmd, ctx = sub, sub.make_context(name, args, parent=ctx)


ALL = recipes()


def test_the_recipe_list_is_found():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    assert {"mnist-ideal", "mnist-sfddm", "mnist-aedm", "cifar10-tandemgan"} <= set(ALL)


def refusal(command: str, argv: list[str]) -> str | None:
    """Why `command argv` would be refused by its parser, or None when it parses.

    A shell variable ($s, ${m}) stands for a value the text cannot show: it is parsed as "1", and a
    complaint about exactly that option's value is accepted."""
    variable = {i for i, a in enumerate(argv) if re.fullmatch(r"\$\{?\w+\}?", a)}
    filled = ["1" if i in variable else a for i, a in enumerate(argv)]
    try:
        parse_only(command, filled)
    except (click.exceptions.Exit, typer.Exit):
        return None  # --help, --version: handled while parsing, nothing to refuse
    except (click.exceptions.UsageError, _typer_click_exceptions.UsageError) as e:
        opts = set(getattr(getattr(e, "param", None), "opts", []) or [])
        if any(i > 0 and argv[i - 1] in opts for i in variable):
            return None
        return e.format_message()
    return None


@pytest.mark.parametrize("recipe", ALL)
def test_every_kd_call_in_the_recipe_parses(recipe):
    calls = invocations(recipe)
    if recipe != "digits-steal":  # that one runs recipes/demo.sh
        assert calls, f"make -n {recipe} shows no kd- command"
    for command, argv in calls:
        if any("$@" in a for a in argv):
            continue  # shell-function plumbing: kd() { PATH=... "$@"; }
        why = refusal(command, argv)
        if why is not None:
            pytest.fail(f"make {recipe}: `{command} {shlex.join(argv)}` is refused: {why}")


SCRIPTS = sorted((ROOT / "benchmarks").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_kd_call_in_a_benchmark_script_parses(script):
    """The device scripts run where a failure costs lent GPU time: their kd- lines are checked like recipes'."""
    calls = kd_calls(script.read_text())
    assert calls, f"{script.name} shows no kd- command"
    for command, argv in calls:
        why = refusal(command, argv)
        if why is not None:
            pytest.fail(f"{script.name}: `{command} {shlex.join(argv)}` is refused: {why}")
