"""Every kd- command line shown in the README and docs/ is accepted by the command it calls.

A user copies these lines first; a renamed or removed flag must fail here, not in their terminal. Code is
what markdown renders as code: fenced blocks and blocks indented by four spaces after a blank line (list
items and their continuations are prose). A fenced block tagged with another language (```text for a
program's output, ```json, ```python) is not shell and is skipped. Each kd- call is parsed by its command's own click parser
without running it, as for the make recipes (tests/test_recipes.py).
"""

import re
import shlex

import pytest

from conftest import ROOT
from test_recipes import MODULES, kd_calls, refusal

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def code_blocks(markdown: str) -> list[tuple[int, str]]:
    """(first line number, text) of each fenced or indented code block of a markdown page."""
    blocks, current, start, fenced, shell, previous_blank = [], [], 0, False, True, True
    for number, line in enumerate(markdown.splitlines(), 1):
        if line.lstrip().startswith("```"):
            if fenced:
                if shell:
                    blocks.append((start, "\n".join(current)))
                current, fenced = [], False
            else:
                if current:  # an indented block just before the fence
                    blocks.append((start, "\n".join(current)))
                fenced, start, current = True, number + 1, []
                shell = line.strip().removeprefix("```").strip() in {"", "sh", "bash", "shell", "console"}
        elif fenced:
            current.append(line)
        elif line.startswith("    ") and (current or previous_blank) and not re.match(r"\s*([-*+]|\d+\.)\s", line):
            if not current:
                start = number
            current.append(line[4:])
        elif current and not line.strip():
            current.append("")  # a blank line inside an indented block
        else:
            if current:
                blocks.append((start, "\n".join(current)))
            current = []
        previous_blank = not line.strip()
    if current:
        blocks.append((start, "\n".join(current)))
    return blocks


def test_the_tokeniser_sees_pipes_continuations_and_code_blocks():
    page = "Prose naming kd-query --nonsense is not code.\n\n    kd-gen-queries noise -n 5 \\\n" \
           "      | kd-query v.safetensors --mode label > out.kds\n\n- a list item\n    continued kd-eval --x\n" \
           "\n```text\nkd-serve (output)  1.0\n```\n\n```sh\nkd-eval accuracy s.safetensors --data mnist\n```\n"
    blocks = code_blocks(page)
    assert [b[0] for b in blocks] == [3, 14]
    assert kd_calls(blocks[1][1]) == [("kd-eval", ["accuracy", "s.safetensors", "--data", "mnist"])]
    assert kd_calls(blocks[0][1]) == [("kd-gen-queries", ["noise", "-n", "5"]),
                                      ("kd-query", ["v.safetensors", "--mode", "label"])]
    assert refusal("kd-query", ["v.safetensors", "--mode", "label"]) is None
    assert "--no-such-flag" in refusal("kd-query", ["v.safetensors", "--no-such-flag"])
    assert refusal("kd-query", ["--help"]) is None
    # torchrun's -m form and descriptor redirects
    assert kd_calls("torchrun --nproc_per_node 2 -m kdtools.cli.gen_queries noise -n 200 2>err.txt") == \
        [("kd-gen-queries", ["noise", "-n", "200"])]


def inline_calls(markdown: str) -> list[str]:
    """Inline code spans of the prose that start with a kd- command (`kd-eval log q.h5`, `bin/kd-query --help`),
    also those the page's hard wrapping splits over two lines."""
    prose = re.sub(r"^\s*```.*?^\s*```", "", markdown, flags=re.S | re.M)  # fenced blocks are checked as blocks
    spans = [" ".join(m.split()) for m in re.findall(r"`([^`]+)`", prose) if "\n\n" not in m and m.strip()]
    return [m for m in spans if m.split()[0].rsplit("/", 1)[-1] in MODULES]


def test_inline_spans_are_found():
    page = "use `kd-eval accuracy --per-class` or `--debug`, not `kd-evil`;\nsee `kd-query v.safetensors\n--mode label`.\n" \
           "```\nkd-x `kd-distill --in-a-fence`\n```\n`bin/kd-serve --help`"
    assert inline_calls(page) == ["kd-eval accuracy --per-class", "kd-query v.safetensors --mode label", "bin/kd-serve --help"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_kd_call_shown_in_the_docs_parses(page):
    refused = []
    for first_line, block in code_blocks(page.read_text()):
        for command, argv in kd_calls(block):
            elided = "..." in argv  # `kd-x sub ... --flag`: only what is shown can be checked
            why = refusal(command, [a for a in argv if a != "..."])
            if why is not None and not (elided and why.startswith("Missing")):
                refused.append(f"{page.name} (block at line {first_line}): `{command} {shlex.join(argv)}`: {why}")
    # Inline spans name a command with the flags the sentence is about, seldom a whole command line: an
    # unknown flag or a bad value is an error; a missing argument, a flag named without its value
    # (`kd-query --log`) or a placeholder sub-command (`kd-gen-queries METHOD`) is not.
    for span in inline_calls(page.read_text()):
        for command, argv in kd_calls(span):
            why = refusal(command, [a for a in argv if a not in {"...", "…"}])
            partial = why is not None and (why.startswith("Missing") or
                                           (why.endswith("requires an argument.") and argv[-1].startswith("-")) or
                                           re.search(r"no sub-command '[A-Z]+'", why))
            if why is not None and not partial:
                refused.append(f"{page.name} (inline): `{span}`: {why}")
    assert not refused, "\n".join(refused)
