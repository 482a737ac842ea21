"""Every command shown in README.md and docs/ is checked against the real CLI, and run.

Two levels, so that a renamed or removed option fails CI wherever the docs show it:

1. **Every fragment** (inline ``livescope ...`` in backticks, README's command table, and every
   command line of a code block): its subcommand exists and each ``--option`` it names is one
   that subcommand takes; a concrete command (no ``[...]``, ``|`` or ``...``) parses with the
   real parser. ``python bench/X.py --opt`` lines: the script exists and takes ``--opt``.
2. **Every code-block command is run**, doc by doc in the order shown, in a folder holding small
   real data under the names the docs use (``movie.tif``: the cancer-cell migration crop;
   ``bead.tif``: the bead PSF; ``mine.lsmodel``, ``models/n2v``: a livescope model and a CAREamics
   Model Zoo package), the way a user runs it (``python -m livescope.daemon.cli`` in a
   subprocess). What a user's run would take minutes for is bounded, and only that: a fit gets
   at most 3 steps and 20 s, a daemon on the simulated microscope or a process run 6 frames, a
   daemon that waits for a camera (``--source zmq``) is started, asked for its status and
   stopped, a client command (``status``, ``stop``, ``fit --live``, ``view``) runs against a
   daemon started for it. What cannot run here fails as the docs say it does: ``compile`` and the
   TensorRT backend without TensorRT exit 2 with a message naming the install. A doc's commands
   share the folder (a fitted model is there for the next command), but an ``--out`` store an
   earlier command wrote is removed first: the docs show alternatives, each as a first run. Not run:
   ``make demo`` / ``make test`` (CI is ``make test``), ``pip install`` lines (the Makefile
   installs) and ``python bench/...`` (benchmarks, minutes each; their options are checked).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from livescope.daemon.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
REAL = REPO / "tests" / "data" / "real"

# lines inside code blocks that are a command's printed output, not a command
OUTPUT_LINES = ("livescope daemon: ", "livescope WB reaches", "livescope RL reaches")


def _subparsers(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:  # argparse has no public walk over its subcommands
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[f"{prefix}{name}"] = sub
                found.update(_subparsers(sub, f"{prefix}{name} "))
    return found


PARSER = build_parser()
COMMANDS = _subparsers(PARSER)
TOP_OPTIONS = {s for a in PARSER._actions for s in a.option_strings}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def _strip_comment(line: str) -> str:
    return re.split(r"\s#\s|\s{2,}#", line, maxsplit=1)[0].strip()


def _block_commands(text: str):
    """(line number, command) of every shell command line in the fenced blocks, continuations joined."""
    for match in re.finditer(r"^```([^\n]*)\n(.*?)^```", text, re.S | re.M):
        if match.group(1).strip() in ("python", "toml", "json", "yaml"):
            continue
        start = text.count("\n", 0, match.start(2)) + 1
        lines = match.group(2).split("\n")
        i = 0
        while i < len(lines):
            line = lines[i].strip()
            first = i
            if line.startswith("$ "):
                line = line[2:]
            if re.match(r"(livescope|python|make|pip) ", line) and not line.startswith(OUTPUT_LINES):
                cmd = _strip_comment(line)
                while cmd.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    cmd = cmd[:-1].rstrip() + " " + _strip_comment(lines[i].strip())
                # a block line may list several bench commands side by side
                for part in re.split(r"\s{3,}(?=python )", cmd):
                    yield start + first, part.strip()
            i += 1


def _inline_commands(text: str):
    for match in re.finditer(r"`(livescope [a-z][^`]*)`", text):
        line = text.count("\n", 0, match.start()) + 1
        yield line, match.group(1).replace("\\|", "|")


def _fragments():
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        name = doc.relative_to(REPO).as_posix()
        for line, cmd in _block_commands(text):
            yield name, line, cmd, "block"
        for line, cmd in _inline_commands(text):
            yield name, line, cmd, "inline"


FRAGMENTS = list(_fragments())


def _subcommand(words: list[str]) -> tuple[str | None, list[str]]:
    """The subcommand (``keys init`` for two words) and the words after it."""
    rest = [w for w in words[1:] if w not in ("-v", "-vv", "-q")]
    if not rest:
        return None, []
    if len(rest) > 1 and f"{rest[0]} {rest[1]}" in COMMANDS:
        return f"{rest[0]} {rest[1]}", rest[2:]
    return rest[0], rest[1:]


def test_the_docs_show_commands_at_all():
    # the extraction itself: it finds the commands it is meant to check (a broken regex cannot pass)
    blocks = [f for f in FRAGMENTS if f[3] == "block" and f[2].startswith("livescope ")]
    inline = [f for f in FRAGMENTS if f[3] == "inline"]
    assert len(blocks) >= 25 and len(inline) >= 60
    assert any(f[0] == "docs/denoising.md" and f[2].startswith("livescope fit movie.tif") for f in blocks)


@pytest.mark.parametrize("doc,line,cmd,kind", FRAGMENTS, ids=[f"{f[0]}:{f[1]}" for f in FRAGMENTS])
def test_each_documented_command_names_real_options(doc, line, cmd, kind):
    words = cmd.split()
    if words[0] == "python" and len(words) > 1 and words[1].endswith(".py"):
        script = REPO / words[1]
        assert script.is_file(), f"{doc}:{line}: {words[1]} does not exist"
        source = script.read_text(encoding="utf-8")
        for opt in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", cmd):
            assert f'"{opt}"' in source, f"{doc}:{line}: {words[1]} takes no {opt}"
        return
    if words[0] != "livescope":
        return  # make, pip: run by CI itself
    name, rest = _subcommand(words)
    assert name in COMMANDS, f"{doc}:{line}: `{cmd}`: livescope has no command {name!r}"
    allowed = _options(COMMANDS[name]) | TOP_OPTIONS
    for opt in re.findall(r"(?<![\w-])--?[a-zA-Z][a-zA-Z0-9-]*", " ".join(rest)):
        if "*" in opt or not opt.startswith("-"):
            continue
        assert opt in allowed, f"{doc}:{line}: `{cmd}`: livescope {name} has no option {opt}"
    concrete = kind == "block" and not re.search(r"[\[|]|\.\.\.", cmd)  # inline: often a name only
    if concrete:
        try:
            PARSER.parse_args(shlex.split(cmd)[1:])
        except SystemExit as exc:
            pytest.fail(f"{doc}:{line}: `{cmd}` does not parse (exit {exc.code})")


# ---------------------------------------------------------------------------------------- run

BLOCKS: dict[str, list[tuple[int, str]]] = {}
for _doc, _line, _cmd, _kind in FRAGMENTS:
    if _kind == "block" and _cmd.startswith("livescope "):
        BLOCKS.setdefault(_doc, []).append((_line, _cmd))


def _set_option(argv: list[str], name: str, value: str, *, at_most: float | None = None) -> list[str]:
    """``name value`` in argv: added when absent, lowered to at most ``at_most`` when larger."""
    if name in argv:
        i = argv.index(name)
        if at_most is not None and float(argv[i + 1]) > at_most:
            argv[i + 1] = value
        return argv
    return [*argv, name, value]


class Runner:
    """Runs one doc's commands in order, in one folder, as a user would (a subprocess each)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.env = dict(os.environ)
        self.env.update(
            LIVESCOPE_KEYS_DIR=str(folder / "keys"),
            QT_QPA_PLATFORM="offscreen",
            PYTHONPATH=os.pathsep.join([str(REPO.parent), self.env.get("PYTHONPATH", "")]),
        )
        self.log: list[str] = []

    def cli(self, argv: list[str], *, timeout: float = 180, background: bool = False):
        full = [sys.executable, "-m", "livescope.daemon.cli", *argv]
        self.log.append(shlex.join(argv))
        if background:
            return subprocess.Popen(
                full,
                cwd=self.folder,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        return subprocess.run(full, cwd=self.folder, env=self.env, capture_output=True, text=True, timeout=timeout)

    def wait_answering(self, daemon: subprocess.Popen, curve: list[str]) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if daemon.poll() is not None:
                raise AssertionError(f"the daemon exited ({daemon.returncode}): {daemon.stderr.read()[-2000:]}")
            if self.cli(["status", *curve, "--timeout", "1"], timeout=30).returncode == 0:
                return
            time.sleep(0.5)
        raise AssertionError("the daemon never answered `livescope status`")

    def stop(self, daemon: subprocess.Popen, curve: list[str]) -> None:
        reply = self.cli(["stop", *curve], timeout=60)
        try:
            daemon.wait(timeout=60)
        finally:
            if daemon.poll() is None:
                daemon.kill()
        assert reply.returncode == 0, reply.stderr
        assert daemon.returncode == 0, daemon.stderr.read()[-2000:] if daemon.stderr else ""

    def with_daemon(self, argv: list[str], curve: list[str], engines: str | None = None):
        """A client command against a simulated-microscope daemon started for it."""
        chain = ["--engines", engines] if engines else []
        daemon = self.cli(["daemon", "--source", "sim", "--sim-size", "128", *chain, *curve], background=True)
        try:
            self.wait_answering(daemon, curve)
            result = self.cli(argv, timeout=180)
        finally:
            self.stop(daemon, curve)
        return result


def _prepare(folder: Path) -> None:
    import tifffile

    movie = tifffile.imread(REAL / "cancer_cell_migration_crop.tif")  # a movie that says it is one
    tifffile.imwrite(
        folder / "movie.tif",
        movie,
        imagej=True,
        resolution=(1 / 0.108, 1 / 0.108),
        metadata={"axes": "TYX", "unit": "um", "finterval": 2.0},
    )
    shutil.copy(REAL / "psf_from_beads.tif", folder / "bead.tif")
    # models a user has: their own livescope model, and a CAREamics package (docs/models.md)
    from livescope.engines.modelfile import default_model_path

    shutil.copy(default_model_path(), folder / "mine.lsmodel")
    package = REPO / "tests" / "data" / "bmz_careamics_n2v" / "careamics_n2v.bioimageio.zip"
    shutil.unpack_archive(package, folder / "models" / "n2v")


def _run(runner: Runner, cmd: str) -> subprocess.CompletedProcess | None:
    argv = shlex.split(cmd)[1:]
    if "..." in argv:
        argv.remove("...")
    name, _ = _subcommand(["livescope", *argv])
    curve = ["--curve"] if "--curve" in argv else []
    gpu = "tensorrt" in argv or any("device=gpu" in a for a in argv)
    if name == "fit":
        argv = _set_option(argv, "--steps", "3", at_most=3)
        argv = _set_option(argv, "--seconds", "20", at_most=20)
        if "--live" in argv:
            argv = _set_option(argv, "--frames", "8", at_most=8)
            task = argv[argv.index("--task") + 1] if "--task" in argv else "denoise"
            return runner.with_daemon(argv, curve, engines=task)  # a daemon running the engine it fits
    if "--out" in argv and name in ("process", "daemon"):
        out = runner.folder / argv[argv.index("--out") + 1]
        shutil.rmtree(out, ignore_errors=True)  # the docs show alternatives, each as a first run
    if name == "process":
        argv = _set_option(argv, "--frames", "6", at_most=6)
        argv = _set_option(argv, "--workers", "0")
    if name in ("status", "stop", "view"):
        if name == "view":
            argv = _set_option(argv, "--seconds", "1", at_most=1)
        return runner.with_daemon(argv, curve)
    if name == "daemon":
        source = argv[argv.index("--source") + 1] if "--source" in argv else "sim"
        if source.startswith("zmq") or "--curve" in argv:
            daemon = runner.cli(argv, background=True)
            try:
                runner.wait_answering(daemon, curve)
            finally:
                runner.stop(daemon, curve)
            return None
        argv = _set_option(argv, "--frames", "6", at_most=6)
        argv = _set_option(argv, "--sim-size", "128")
    if name == "compile" or gpu:
        result = runner.cli(argv)
        if result.returncode != 0:  # no TensorRT / GPU here: the message names the fix
            assert result.returncode == 2 and "install" in result.stderr, result.stderr
            assert "Traceback" not in result.stderr, result.stderr
        return None
    return runner.cli(argv)


@pytest.mark.parametrize("doc", sorted(BLOCKS))
def test_each_documented_command_runs(doc, tmp_path):
    _prepare(tmp_path)
    runner = Runner(tmp_path)
    text = (REPO / doc).read_text(encoding="utf-8")
    for line, cmd in BLOCKS[doc]:
        if cmd.startswith("livescope daemon --config rig.toml"):  # the docs show its refusal
            continue
        if re.search(r"[\[|]", cmd):  # a synopsis (docs/process.md): its options are checked above
            continue
        result = _run(runner, cmd)
        if result is not None:
            assert result.returncode == 0, f"{doc}:{line}: `{cmd}` -> {runner.log[-1]}\n{result.stderr[-3000:]}"
            assert "Traceback" not in result.stderr, f"{doc}:{line}: `{cmd}`\n{result.stderr[-3000:]}"
    assert text  # the doc was read


def test_the_configuration_refusal_shown_in_the_docs_is_what_the_daemon_prints(tmp_path):
    """docs/config.md shows a refusal and its exact output: the same file gives the same lines."""
    text = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    block = re.search(r"```\n\$ (livescope daemon --config rig.toml[^\n]*)\n(.*?)```", text, re.S)
    assert block, "docs/config.md no longer shows the refusal example"
    cmd, shown = block.group(1), block.group(2).strip().splitlines()
    (tmp_path / "rig.toml").write_text('engines = ["denoise"]\nmemory_budget_mb = "2GB"\n')
    result = Runner(tmp_path).cli(shlex.split(cmd)[1:])
    assert result.returncode == 2
    printed = result.stderr.strip().splitlines()
    assert printed[0] == shown[0]
    for want, got in zip(shown[1:], printed[1:], strict=True):
        want = want.strip().removesuffix("...").rstrip(", ")
        assert got.strip().startswith(want), (want, got)


# ------------------------------------------------------------------------------ python examples


def _python_blocks():
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
            line = text.count("\n", 0, match.start()) + 1
            yield f"{doc.relative_to(REPO).as_posix()}:{line}", match.group(1)


PY_BLOCKS = list(_python_blocks())


@pytest.mark.parametrize("where,code", PY_BLOCKS, ids=[b[0] for b in PY_BLOCKS])
def test_each_python_example_uses_the_api_that_exists(where, code):
    """The python examples in the docs: valid code, every livescope name they import exists, and
    every call of an imported livescope function or class (``create_engine`` included, with the
    engine's parameters) passes only keywords it takes."""
    import ast
    import importlib
    import inspect

    from livescope.engines import available_engines, engine_factory

    tree = ast.parse(code.replace("\n...\n", "\npass\n"), filename=where)
    imported: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("livescope"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{where}: {node.module} has no {alias.name}"
                imported[alias.asname or alias.name] = getattr(module, alias.name)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in imported):
            continue
        target = imported[node.func.id]
        keywords = {k.arg for k in node.keywords if k.arg}
        if node.func.id == "create_engine" and node.args and isinstance(node.args[0], ast.Constant):
            name = node.args[0].value
            assert name in available_engines(), f"{where}: no engine {name!r}"
            params = set(getattr(engine_factory(name), "parameters", {}))
            inner = next((k.value for k in node.keywords if k.arg == "restore"), None)
            if isinstance(inner, ast.Constant):  # the trust wrapper takes its inner engine's too
                params |= set(getattr(engine_factory(inner.value), "parameters", {}))
            unknown = keywords - params
            assert not unknown, f"{where}: engine {name!r} has no parameter {sorted(unknown)}"
            continue
        try:
            signature = inspect.signature(target)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
            continue
        unknown = keywords - set(signature.parameters)
        assert not unknown, f"{where}: {node.func.id}() takes no {sorted(unknown)}"
