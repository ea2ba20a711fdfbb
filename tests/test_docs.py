"""The README and docs/*.md, checked against the code: every command they show is parsed by the real `captioner`
argparse parser (or checked against the script, extra or route it names), a handful are run as written, every
relative link points at a file (and heading) that exists, and the README stays a guide (at most 300 lines).

A shell command lives in a ```bash / ```sh / ```shell block (every line) or a ```console block (lines starting with
"$ "); `\\` continuations are joined and `#` comments dropped. How each command is checked:

    captioner ..., python -m captioner ..., torchrun ... -m captioner ...
                      parsed with the subcommand's parser from captioner/cli/parsers.py (as captioner.cli.main picks
                      it, --task included), without running it: a renamed or removed flag fails; paths need not exist
    RUN (below)       also run as written, in a temporary folder, on the shipped model (files they name are made)
    python X.py / -m  the script or module exists and declares every --flag the command passes
    pip install       every extra named in ".[a,b]" is in pyproject.toml
    docker, curl, ray, bash recipes/*.sh
                      checked statically (compose services, Dockerfile, the service's routes, the script exists),
                      then skipped with the reason: they need a Docker engine, a running server, a cluster or hours
Any other command fails the test until this file learns how to check it.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
# a fence must say what it holds (so no command escapes these checks by sitting in an unlabelled block)
KNOWN_LANGS = SHELL | {"python", "json", "text"}
# shell utilities that appear around the commands (pipes, bodies for curl); nothing to check
UTILITIES = {"head", "printf", "cat", "cd", "mkdir", "ls", "export", "echo", "tail"}

# The exact set-up commands of the README (kept character for character: users and .ci/run rely on them).
SETUP_SERVE = 'python3 -m venv .venv && .venv/bin/pip install -e ".[serve]" && .venv/bin/captioner serve'
SETUP_TEST = 'python3 -m venv .venv && .venv/bin/pip install -e ".[serve,test,ray]" && .venv/bin/python -m pytest -q'


def _red_triangle(folder: Path) -> None:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(im).polygon([(32, 8), (56, 54), (8, 54)], fill=(220, 30, 30))
    im.save(folder / "shape.png")


def _photos(folder: Path) -> None:
    import numpy as np
    from PIL import Image

    (folder / "photos").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / "photos" / name)


def _jsonl(path: str, n: int):
    def check(folder: Path, out: str) -> None:
        rows = [json.loads(line) for line in (folder / path).read_text().splitlines()]
        assert len(rows) == n and all(r["captions"][0]["caption"].strip() for r in rows), rows[:3]
    return check


def _contains(*texts: str):
    def check(folder: Path, out: str) -> None:
        for t in texts:
            assert t in out, out[-2000:]
    return check


# Commands run as written (the exact text of the docs, continuations joined): what each needs made first, and what
# its output must show. Cheap and self-contained on a fresh clone: the shipped model, a few tiny images.
RUN = {
    "captioner --version": (None, _contains("captioner ")),
    "captioner caption --help": (None, _contains("usage: captioner caption", "--out")),
    "captioner caption photos/ --out captions.jsonl": (_photos, _jsonl("captions.jsonl", 2)),
    'captioner ask shape.png --question "What is the red shape?" --choice circle --choice rectangle --choice triangle':
        (_red_triangle, _contains("Q: What is the red shape?", "-> triangle")),
    'captioner ask shape.png -q "Is there a blue shape?" -c yes -c no --json':
        (_red_triangle, _contains('"answer": "no"')),
    # needs ../shared/data (skipped with a reason without it)
    "captioner caption ../shared/data/coco-mini/val2017 --out coco-mini.jsonl --no-progress":
        (None, _jsonl("coco-mini.jsonl", 208)),
}


@dataclass(frozen=True)
class Command:
    doc: str   # path relative to ROOT
    line: int  # first line of the command in the file
    text: str  # continuations joined, comment dropped, block variables ($D=...) expanded
    raw: str   # as written (continuations joined)

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def fenced_blocks(path: Path) -> list[tuple[int, str, str]]:
    """(line of the first content line, language, content) of every fenced block."""
    out, lang, start, buf = [], None, 0, []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, start, buf = line[3:].strip(), n + 1, []
            else:
                out.append((start, lang, "\n".join(buf)))
                lang = None
        elif lang is not None:
            buf.append(line)
    assert lang is None, f"{path.name}: unclosed code fence"
    return out


def commands_of(doc: Path) -> list[Command]:
    cmds = []
    for start, lang, text in fenced_blocks(doc):
        if lang not in SHELL:
            continue
        vars_: dict[str, str] = {}
        lines = text.split("\n")
        i = 0
        while i < len(lines):
            n, line = start + i, lines[i]
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i].strip()
            i += 1
            if lang == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            raw = re.sub(r"\s+", " ", _strip_comment(line)).strip()
            m = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(\S+)", raw)
            if m:  # D=../shared/data: used by the commands below it
                vars_[m.group(1)] = m.group(2)
            text_ = re.sub(r"\$\{?([A-Z_][A-Z0-9_]*)\}?", lambda v: vars_.get(v.group(1), v.group(0)), raw)
            cmds.append(Command(str(doc.relative_to(ROOT)), n, text_, raw))
    return cmds


def _strip_comment(line: str) -> str:
    """The line without its trailing # comment (a # inside quotes or a word stays)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


ALL = [c for d in DOCS for c in commands_of(d)]


def pipeline_parts(text: str) -> list[list[str]]:
    """The simple commands of a line (split at && || | ;), env assignments and redirections removed."""
    lex = shlex.shlex(text, posix=True, punctuation_chars="|&;<>")
    lex.whitespace_split = True
    parts, cur = [], []
    tokens = list(lex)
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t in ("&&", "||", "|", ";"):
            parts.append(cur)
            cur = []
        elif t in (">", ">>", "<", "2>", "&>"):
            i += 1  # and its target
        elif t == "&":
            pass
        else:
            cur.append(t)
        i += 1
    parts.append(cur)
    out = []
    for p in parts:
        while p and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", p[0]):
            p = p[1:]
        if p:
            out.append(p)
    return out


def parse_captioner(argv: list[str]) -> None:
    """Parse `captioner ARGV` as captioner.cli.main would, without running it; fail with argparse's message."""
    from captioner import cli

    assert "..." not in argv, f"write the whole command, not '...': {argv}"
    if argv[:1] in (["--version"], ["-V"]):
        return
    assert argv and argv[0] in cli.COMMANDS, f"no such command: captioner {argv[:1]}"
    rest = [a for a in argv[1:] if a != "--debug"]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser, _ = cli._pick(argv[0], rest)
            parser().parse_args(rest)
    except SystemExit as e:
        if e.code in (0, None) and ("--help" in rest or "-h" in rest):
            return
        pytest.fail(f"captioner {' '.join(argv)}\n{err.getvalue() or e}")


def _declares(source: Path, flag: str) -> bool:
    text = source.read_text(encoding="utf-8")
    return f'"{flag}"' in text or f"'{flag}'" in text or re.search(rf"(^|\s){re.escape(flag)}(\s|=|$)", text, re.M)


def check_script(argv: list[str]) -> None:
    """python X.py ARGS / python -m pkg.mod ARGS: the file exists and declares every --flag."""
    if argv[:2] == ["-m", "venv"] or argv[:2] == ["-m", "pytest"]:
        return
    if argv[:2] == ["-m", "captioner"]:
        return parse_captioner(argv[2:])
    if argv[0] == "-m":
        source = ROOT / (argv[1].replace(".", "/") + ".py")
        args = argv[2:]
    else:
        source, args = ROOT / argv[0], argv[1:]
    assert source.is_file(), f"{source.relative_to(ROOT)} does not exist"
    for a in args:
        if a.startswith("--"):
            flag = a.split("=")[0]
            assert _declares(source, flag), f"{source.relative_to(ROOT)} has no option {flag}"


def check_pip(argv: list[str]) -> None:
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = set(re.findall(r"^([A-Za-z0-9_-]+)\s*=", section, re.M))  # (tomllib is Python >= 3.11)
    for a in argv:
        m = re.fullmatch(r"\.\[([a-z0-9_,-]+)\]", a)
        if m:
            unknown = set(m.group(1).split(",")) - set(extras)
            assert not unknown, f"no such extra in pyproject.toml: {sorted(unknown)}"


def check_docker(argv: list[str]) -> str:
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose.get("services", {})
    if argv[:2] == ["docker", "compose"]:
        rest = argv[2:]
        if "--profile" in rest:
            profile = rest[rest.index("--profile") + 1]
            assert any(profile in (s.get("profiles") or []) for s in services.values()), f"no compose profile {profile}"
        if "up" in rest:
            for name in rest[rest.index("up") + 1:]:
                assert name.startswith("-") or name in services, f"no compose service {name}"
    elif argv[1] == "build":
        assert (ROOT / "Dockerfile").is_file()
    return "needs a Docker engine (checked against docker-compose.yml / Dockerfile only)"


def check_curl(argv: list[str]) -> str:
    routes = "".join(p.read_text() for p in (ROOT / "service" / "routers").glob("*.py"))
    for a in argv:
        m = re.match(r"https?://[^/]+(/\S*)", a)
        if m:
            assert f'"{m.group(1)}"' in routes, f"the service has no route {m.group(1)}"
    return "needs a running server (the URL's route was checked against service/routers/)"


def check(cmd: Command) -> str | None:
    """Check one command; return a reason to skip it after the static checks, or None."""
    skip = None
    for argv in pipeline_parts(cmd.text):
        prog = argv[0].removeprefix(".venv/bin/")
        if prog == "captioner":
            parse_captioner(argv[1:])
        elif prog in ("python", "python3"):
            check_script(argv[1:])
        elif prog == "torchrun":
            assert "-m" in argv and argv[argv.index("-m") + 1] == "captioner", cmd.text
            parse_captioner(argv[argv.index("-m") + 2:])
            skip = skip or "torchrun needs several processes (or GPUs); its captioner command was parsed"
        elif prog == "pip":
            check_pip(argv[1:])
        elif prog == "docker":
            skip = check_docker(argv)
        elif prog == "curl":
            skip = check_curl(argv)
        elif prog == "ray":
            skip = "needs a Ray cluster of machines"
        elif prog == "bash" and argv[1:2] and argv[1].startswith("recipes/"):
            assert (ROOT / argv[1]).is_file(), argv[1]
            skip = "a recipe: hours of training"
        elif prog in UTILITIES:
            pass
        else:
            pytest.fail(f"{cmd.id}: tests/test_docs.py does not know how to check {prog!r}; teach it")
    return skip


def test_the_docs_show_commands():
    assert len(ALL) > 40 and any(c.text.startswith("captioner serve") for c in ALL)


@pytest.mark.parametrize("cmd", ALL, ids=lambda c: c.id)
def test_command_parses(cmd: Command):
    reason = check(cmd)
    if reason:
        pytest.skip(reason)


def _needs_shared(cmd: Command) -> bool:
    return "../shared/data" in cmd.text


@pytest.mark.parametrize("text", [pytest.param(t, marks=[pytest.mark.slow, pytest.mark.shared_data])
                                  if "../shared/data" in t else t for t in RUN])
def test_command_runs(text: str, tmp_path: Path):
    found = [c for c in ALL if c.raw == text]
    assert found, f"{text!r} is no longer in the docs: update RUN in tests/test_docs.py"
    if _needs_shared(found[0]) and not SHARED.is_dir():
        pytest.skip("needs ../shared/data (Flickr8k, coco-mini), which a fresh clone does not have")
    make, expect = RUN[text]
    if make:
        make(tmp_path)
    argv = shlex.split(text.replace("../shared/data", str(SHARED)))
    assert argv[0] == "captioner"
    r = subprocess.run([sys.executable, "-m", "captioner", *argv[1:]], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    expect(tmp_path, r.stdout)


def test_every_fence_says_its_language():
    for doc in DOCS:
        for line, lang, _ in fenced_blocks(doc):
            assert lang in KNOWN_LANGS, f"{doc.relative_to(ROOT)}:{line - 1}: fence language {lang!r}"


def test_python_blocks_compile():
    for doc in DOCS:
        for line, lang, text in fenced_blocks(doc):
            if lang == "python":
                compile(text, f"{doc.relative_to(ROOT)}:{line}", "exec")


def _options(command: str) -> set[str]:
    from captioner import cli

    parsers = {p for (c, _), (p, _) in cli.RUNS.items() if c == command}
    return {o for p in parsers for a in p()._actions for o in a.option_strings}


def test_inline_captioner_commands_name_real_options():
    """`captioner CMD --flag ...` in running text: CMD exists and has every --flag shown (train and evaluate: of any
    --task)."""
    from captioner import cli

    for doc in DOCS:
        text = re.sub(r"^```.*?^```", "", doc.read_text(encoding="utf-8"), flags=re.S | re.M)
        for span in re.findall(r"`(captioner [^`]+)`", text.replace("\n", " ")):
            words = span.split()
            if words[1].startswith("-") or words[1].isupper():
                continue  # `captioner --version`, `captioner CMD`
            assert words[1] in cli.COMMANDS, f"{doc.name}: `{span}`"
            opts = _options(words[1])
            for flag in re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", " ".join(words[2:])):
                assert flag in opts, f"{doc.name}: `{span}`: captioner {words[1]} has no {flag}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", doc.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def test_relative_links_point_at_files_and_headings():
    for doc in DOCS:
        text = re.sub(r"^```.*?^```", "", doc.read_text(encoding="utf-8"), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            assert dest.exists(), f"{doc.relative_to(ROOT)}: link to {target}: no such file"
            if anchor and dest.suffix == ".md":
                assert anchor in _anchors(dest), f"{doc.relative_to(ROOT)}: link to {target}: no such heading"


def test_the_readme_is_a_guide_that_links_every_docs_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    n = len(text.splitlines())
    assert n <= 300, f"README.md has {n} lines (at most 300: move the details to docs/)"
    for page in (ROOT / "docs").glob("*.md"):
        assert f"](docs/{page.name})" in text, f"README.md does not link docs/{page.name}"


def test_every_docs_page_says_what_it_is_for():
    for page in (ROOT / "docs").glob("*.md"):
        lines = page.read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith("# ") and not lines[1].strip() and lines[2].strip(), page.name


def test_the_setup_commands_are_the_ones_ci_runs():
    """The README's two set-up commands, exactly; .ci/run installs the same extras and runs the same pytest."""
    readme = [c.raw for c in commands_of(ROOT / "README.md")]
    assert SETUP_SERVE in readme and SETUP_TEST in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert '-e ".[serve,test,ray]"' in ci and ".venv/bin/python -m pytest -q" in ci
