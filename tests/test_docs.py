"""Docs that cannot rot: every fenced code block of README.md and docs/*.md, and the commands, config keys and
links of their prose, checked the way a user would paste them (issue 25).

1. ``fairseq-hydra-train`` command lines (``\\`` continuations joined, comments stripped) are composed as
   ``fairseq-hydra-train`` composes them, all in this process: hydra's own argument parser, fairseq's config
   store (``hydra_init``), hydra's composition (run or multirun mode, the hydra part included: launchers and
   their keys), then what fairseq does before and while it builds the run: ``add_defaults`` (the plugin is
   imported, as ``common.user_dir`` imports it, so its task, model and criterion dataclasses are merged), the
   config resolved, the composite optimizer's groups merged with their optimizer and scheduler dataclasses,
   ``common.user_dir`` resolved from the repository root by fairseq's own ``import_user_module``. Placeholders
   become folders made here (MANIFESTS, LABELLED) or real ones (FAIRSEQ, /path/to/..., ``$PWD``: the repository
   root); ``$(python ...)`` is run and its output used. Relative files (``hubert_base_ls960.pt``, ``out/...``)
   stay relative to the repository root: composing reads none of them. One real ``fairseq-hydra-train ...
   --cfg job`` run of README's first command must print the job config composed here (before ``add_defaults``,
   which ``--cfg`` does not reach). ``fairseq-train`` lines go through fairseq's argparse route
   (``options.parse_args_and_arch`` with the plugin as ``--user-dir``); prose fragments only need known flags.
2. ``dphubert-*`` lines parse with the script's parser (``export.build_parser``; another script's ``main`` is run
   up to its ``parse_args``) and each script named answers ``--help``; ``python -m X`` / ``python path.py`` answer
   ``--help`` with exit 0 (in this process; s3prl's launcher in a subprocess) and know every flag the doc gives
   them (a module the docs run as ``$(python -m X)`` is run as written instead); ``bash x.sh`` of this checkout
   exists and parses (``bash -n``); ``pip install`` names only extras that setup.py has; anything else (pip,
   tensorboard, submitit's modules, ...) is counted as not ours.
3. Config keys named in prose (``criterion.x``, ``task.x=v``, ``optimizer.groups.NAME.x``, ``hydra.launcher.x``,
   and bare names chained to one: `` `criterion.l1_weight` / `cos_weight` ``, in tables also ``, ``) exist: task /
   model / criterion in the plugin's dataclasses (else in a registered fairseq dataclass of that kind, for the
   stock recipes the docs name; listed in the summary), the other sections in fairseq's ``FairseqConfig``,
   ``optimizer.*``, ``lr_scheduler.*`` and ``hydra.*`` in the composed recipe configs (hydra's with the SLURM
   launcher when it is installed).
4. ```python blocks run, each in a fresh interpreter (under ``nice``) in its own scratch folder holding a tiny
   fairseq HuBERT teacher as ``hubert_base_ls960.pt`` and a tiny exported student as ``dphubert.pt``. HTML
   comments on the lines right above the fence direct it: ``<!-- doc-test: skip: REASON -->`` (not run; listed
   with the reason), ``<!-- doc-test: needs: MODULE, ... -->`` (skipped and listed when one is missing),
   ``<!-- doc-test: given: NAME, ... -->`` (names the prose defines, made in that interpreter: ``GIVEN``).
5. Relative links ``[..](path)`` and ``(path#anchor)`` resolve; an anchor is a GitHub heading slug of its page.

Every problem is reported as ``doc:line: command or key: why``. ``python -m pytest tests/test_docs.py -s``
prints the counts.
"""

import argparse
import ast
import contextlib
import dataclasses
import glob
import importlib
import importlib.util
import io
import itertools
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import traceback
import warnings
from collections import Counter
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple
from unittest import mock

import helpers
import numpy as np
import pytest
import soundfile as sf
import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

import dphubert_fairseq as dp
from dphubert_fairseq import export as export_cli
from dphubert_fairseq.criterions import DPHuBERTDistillCriterionConfig
from dphubert_fairseq.models.dphubert import DPHuBERTConfig
from dphubert_fairseq.tasks import DPHuBERTDistillConfig

REPO = helpers.REPO
PLUGIN_DIR = os.path.dirname(os.path.abspath(dp.__file__))
DOC_FILES = ["README.md"] + sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))
)
NICE = ["nice", "-n", "19"] if shutil.which("nice") else []
SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
PYTHON_LANGS = {"python", "py", "python3"}
COMMAND_WORDS = {"fairseq-hydra-train", "fairseq-train", "python", "python3", "bash", "pip"}
#: top-level packages of this checkout: ``python -m`` of one of them is ours to check
OUR_PACKAGES = {"dphubert_fairseq", "examples", "benchmarks", "fairseq_runs", "tests"}
#: ``python -m`` modules whose ``--help`` runs in a subprocess (s3prl's launcher patches torchaudio on import),
#: with the modules it needs
HELP_IN_SUBPROCESS = {"dphubert_fairseq.formats.s3prl_hub": ["s3prl"]}
#: names the prose defines around a python block (``<!-- doc-test: given: ... -->``), made in its interpreter
GIVEN = {
    "source": "given['source'] = torch.randn(2, 16000, generator=g) * 0.1  # B x L waveforms, 16 kHz",
    "padding_mask": "given['padding_mask'] = torch.arange(16000).expand(2, -1) >= torch.tensor([[16000], [12000]])",
    "wavs": "given['wavs'] = torch.randn(2, 16000, generator=g) * 0.1  # s3prl's padded batch",
    "wavs_len": "given['wavs_len'] = torch.tensor([16000, 12000])",
}
DIRECTIVES = ("skip", "needs", "given")
#: key names the docs use as placeholders ("a plugin key the yaml does not list needs +criterion.some_key=...")
PLACEHOLDER_KEY_NAMES = {"x", "some_key"}
#: the blocks' subprocesses stay offline and deterministic
SUBPROCESS_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0"}

SUMMARY: Dict[str, List[str]] = {}


# ----- reading the docs -----

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
DIRECTIVE = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<key>[\w-]+)\s*(?::\s*(?P<value>.*?))?\s*-->\s*$")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]\n]|\[[^\]\n]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


@dataclasses.dataclass
class Block:
    doc: str
    line: int  # of the opening fence
    lang: str
    text: str
    directives: Dict[str, str]

    def where(self) -> str:
        return f"{self.doc}:{self.line}"


@dataclasses.dataclass
class Span:
    """Inline code in prose: its text with every run of whitespace made one space (a span may wrap)."""

    line: int
    start: int
    end: int
    text: str
    in_table: bool


@dataclasses.dataclass
class Doc:
    path: str
    blocks: List[Block]
    prose: str  # the file with every fenced block blanked, line numbers kept
    spans: List[Span]
    stray_directives: List[int]  # lines of doc-test comments that sit above no fence

    def line_of(self, offset: int) -> int:
        return self.prose.count("\n", 0, offset) + 1


def _dedent(line: str, indent: int) -> str:
    n = len(line) - len(line.lstrip(" "))
    return line[min(n, indent) :]


def parse_doc(rel: str, text: str) -> Doc:
    lines = text.split("\n")
    blocks: List[Block] = []
    prose: List[str] = []
    openings = set()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append(lines[i])
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"].expandtabs())
        directives, j = {}, i - 1
        while j >= 0 and DIRECTIVE.match(lines[j]):
            d = DIRECTIVE.match(lines[j])
            directives[d["key"]] = (d["value"] or "").strip()
            j -= 1
        body, k = [], i + 1
        while k < len(lines):
            closing = lines[k].strip()
            if closing and set(closing) == {fence[0]} and len(closing) >= len(fence):
                break
            body.append(_dedent(lines[k], indent))
            k += 1
        info = m["info"].strip()
        blocks.append(Block(rel, i + 1, info.split()[0].lower() if info else "", "\n".join(body), directives))
        openings.add(i)
        prose.extend([""] * (min(k, len(lines) - 1) + 1 - i))
        i = k + 1
    stray = []
    for n, line in enumerate(lines):
        if DIRECTIVE.match(line):
            after = n + 1
            while after < len(lines) and DIRECTIVE.match(lines[after]):
                after += 1
            if after not in openings:
                stray.append(n + 1)
    joined = "\n".join(prose)
    spans = []
    for m in CODE_SPAN.finditer(joined):
        if "\n\n" in m.group(2):
            continue
        line_start = joined.rfind("\n", 0, m.start()) + 1
        spans.append(
            Span(
                joined.count("\n", 0, m.start()) + 1,
                m.start(),
                m.end(),
                " ".join(m.group(2).split()),
                joined[line_start:].lstrip().startswith("|"),
            )
        )
    return Doc(rel, blocks, joined, spans, stray)


def read_doc(rel: str) -> Doc:
    with open(os.path.join(REPO, rel), encoding="utf-8") as f:
        return parse_doc(rel, f.read())


DOCS = [read_doc(rel) for rel in DOC_FILES]


def one_line(text: object, limit: int = 400) -> str:
    text = " | ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shortened(command: str, limit: int = 100) -> str:
    return command if len(command) <= limit else command[: limit - 3] + "..."


class Findings:
    """What one check found: failures (``doc:line: what: why``), counts by kind, notes for the summary."""

    def __init__(self) -> None:
        self.failures: List[str] = []
        self.counts: Counter = Counter()
        self.notes: List[str] = []

    def fail(self, where: str, what: str, why: object, limit: int = 400) -> None:
        self.failures.append(f"{where}: {shortened(what)}: {one_line(why, limit)}")

    def record(self, title: str) -> None:
        total = sum(v for k, v in self.counts.items() if not k.startswith("("))
        SUMMARY[title] = [f"{title}: {total}"]
        SUMMARY[title] += [f"  {k}: {v}" for k, v in sorted(self.counts.items())]
        SUMMARY[title] += [f"  - {note}" for note in self.notes]

    def check(self) -> None:
        assert not self.failures, f"{len(self.failures)} problem(s) in the docs:\n" + "\n".join(self.failures)


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    blocks = Counter(b.lang or "plain" for d in DOCS for b in d.blocks)
    print("\n\ndocs checked by tests/test_docs.py:")
    print(
        f"  {len(DOCS)} files, {sum(blocks.values())} fenced blocks: "
        + ", ".join(f"{k} {v}" for k, v in sorted(blocks.items()))
        + " (plain blocks are file trees and printed output: not checked)"
    )
    for lines in SUMMARY.values():
        for line in lines:
            print("  " + line)


# ----- shell command lines -----


def strip_comment(line: str) -> str:
    """``line`` without its shell comment: a ``#`` outside quotes at the start of a word."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def logical_lines(block: Block) -> Iterator[Tuple[int, str]]:
    """(doc line, command) of a shell block: ``\\`` continuations joined, comments stripped."""
    parts: List[str] = []
    start = None
    for n, line in enumerate(block.text.split("\n")):
        if start is None:
            start = n
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        parts.append(line)
        command = strip_comment(" ".join(p.strip() for p in parts)).strip()
        if command:
            yield block.line + 1 + start, command
        parts, start = [], None


@dataclasses.dataclass
class Command:
    where: str
    text: str
    fenced: bool  # a line of a fenced block (a whole command), else inline code in prose (maybe a fragment)


def all_commands(docs: Sequence[Doc]) -> List[Command]:
    commands = []
    for doc in docs:
        for block in doc.blocks:
            if block.lang in SHELL_LANGS:
                commands += [Command(f"{doc.path}:{n}", text, True) for n, text in logical_lines(block)]
        for span in doc.spans:
            first = span.text.split(" ", 1)[0]
            if first in COMMAND_WORDS or (first.startswith("dphubert-") and not first.endswith(":")):
                commands.append(Command(f"{doc.path}:{span.line}", span.text, False))
            elif "$(" in span.text:  # e.g. common.user_dir=$(python -m ...): the substitution is checked
                commands.append(Command(f"{doc.path}:{span.line}", span.text, False))
    return commands


def substitutions(text: str) -> List[Tuple[int, int, str]]:
    """(start, end, inner command) of every ``$(...)`` in ``text``."""
    found, i = [], 0
    while True:
        i = text.find("$(", i)
        if i < 0:
            return found
        depth, quote, j = 0, None, i + 1
        while j < len(text):
            ch = text[j]
            if quote:
                quote = None if ch == quote else quote
            elif ch in "'\"" and depth:
                quote = ch
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        found.append((i, j + 1, text[i + 2 : j]))
        i = j + 1


def python_argv(tokens: Sequence[str]) -> Tuple[str, str, List[str]]:
    """('-m', module, args) / ('-c', code, args) / ('script', path, args) of a ``python ...`` command."""
    rest = list(tokens[1:])
    while rest and rest[0].startswith("-") and rest[0] not in ("-m", "-c"):
        rest.pop(0)  # interpreter options (-u, -O, ...)
    if len(rest) >= 2 and rest[0] in ("-m", "-c"):
        return rest[0], rest[1], rest[2:]
    if rest:
        return "script", rest[0], rest[1:]
    return "repl", "", []


def modules_run_as_written(docs: Sequence[Doc]) -> Set[str]:
    """The modules the docs run as ``$(python -m M ...)``: their output is what the docs use."""
    texts = [c.text for c in all_commands(docs)]
    modules = set()
    for text in texts:
        for _, _, inner in substitutions(text):
            kind, target, _ = python_argv(shlex.split(inner))
            if kind == "-m":
                modules.add(target)
    return modules


@contextlib.contextmanager
def working_directory(path: str):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_in_process(kind: str, target: str, args: Sequence[str]) -> Tuple[int, str, str]:
    """Run ``python -m target args`` / ``python -c target`` / ``python target args`` in this process, from the
    repository root: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    code = 0
    try:
        with working_directory(REPO), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if kind == "-m":
                    sys.argv = [target, *args]
                    runpy.run_module(target, run_name="__main__", alter_sys=False)
                elif kind == "-c":
                    sys.argv = ["-c", *args]
                    exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
                else:
                    sys.argv = [target, *args]
                    sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
                    runpy.run_path(target, run_name="__main__")
    except SystemExit as e:
        code = 0 if e.code is None else (e.code if isinstance(e.code, int) else 1)
        if not isinstance(e.code, (int, type(None))):
            err.write(str(e.code))
    except BaseException:  # what the command raises is the finding
        code = 1
        err.write(traceback.format_exc())
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return code, out.getvalue(), err.getvalue()


class Shell:
    """Expands a command as the shell would here: ``$(python ...)`` run in this process (once per command),
    ``$PWD`` the repository root, placeholders replaced by folders made for the test or real ones."""

    def __init__(self, placeholders: Dict[str, str], found: Findings) -> None:
        self.placeholders = sorted(placeholders.items(), key=lambda kv: -len(kv[0]))
        self.found = found
        self.outputs: Dict[str, Tuple[int, str, str]] = {}

    def substitute(self, text: str, where: str) -> Optional[str]:
        for start, end, inner in reversed(substitutions(text)):
            tokens = shlex.split(inner)
            if not tokens or tokens[0] not in ("python", "python3"):
                self.found.counts["($(...) not ours)"] += 1
                continue
            kind, target, args = python_argv(tokens)
            if inner not in self.outputs:
                self.outputs[inner] = run_in_process(kind, target, args)
                self.found.counts[f"($(python {kind} ...) run)"] += 1
            code, out, err = self.outputs[inner]
            value = out.strip()
            if code != 0 or not value:
                self.found.fail(where, f"$({inner})", f"exit {code}, output {value!r}: {err[-300:]}")
                return None
            if value.startswith("/") and not os.path.exists(value):
                self.found.fail(where, f"$({inner})", f"prints {value}, which does not exist")
                return None
            text = text[:start] + value + text[end:]
        return re.sub(r"\$\{?PWD\}?", REPO, text)

    def tokens(self, command: Command) -> Optional[List[str]]:
        text = self.substitute(command.text, command.where)
        if text is None:
            return None
        try:
            tokens = shlex.split(text)
        except ValueError as e:
            if command.fenced:
                self.found.fail(command.where, command.text, f"not a shell command line: {e}")
            return None
        out = []
        for token in tokens:
            for key, value in self.placeholders:
                token = re.sub(rf"(?<![\w/.+-]){re.escape(key)}(?![\w-])", value, token)
            out.append(token)
        return out


def split_pipeline(tokens: List[str]) -> List[List[str]]:
    parts, current = [], []
    for token in tokens:
        if token in ("&&", "||", ";", "|"):
            parts.append(current)
            current = []
        else:
            current.append(token)
    return [p for p in parts + [current] if p]


# ----- fairseq-hydra-train, composed as it composes -----


def fairseq_dir() -> str:
    import fairseq

    return os.path.dirname(os.path.abspath(fairseq.__file__))


def hydra_cli_args(tokens: Sequence[str]) -> argparse.Namespace:
    """``fairseq-hydra-train``'s own command line, parsed by hydra's parser (ValueError: its message)."""
    from hydra._internal.utils import get_args_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return get_args_parser().parse_args(list(tokens))
    except SystemExit:
        raise ValueError(err.getvalue().strip().splitlines()[-1]) from None


@dataclasses.dataclass
class Composed:
    job: dict  # what ``--cfg job`` prints: the job config before add_defaults, unresolved
    cfg: DictConfig  # what fairseq trains with: after add_defaults (resolved for a whole command)
    hydra: DictConfig


#: the config names ``compose_like_cli`` stored fairseq's schema under
_SCHEMA_NAMES: Set[str] = set()


def compose_like_cli(
    config_dir: str, config_name: str, overrides: Sequence[str], multirun: bool, resolve: bool = True
) -> Composed:
    """The config ``fairseq-hydra-train [-m] --config-dir DIR --config-name NAME OVERRIDES`` would train with
    (fairseq_cli/hydra_train.py), composed in this process; raises what fairseq would raise."""
    from fairseq.dataclass.initialize import add_defaults, hydra_init
    from fairseq.dataclass.utils import omegaconf_no_object_check
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    # fairseq's config store: the yaml named on the command line is matched with FairseqConfig's schema. One
    # process composes one config; here the names stored for earlier commands are taken out again, or a
    # config that lists one of them in its defaults (dphubert_macs.yaml: dphubert) would get the schema twice
    repo = ConfigStore.instance().repo
    for name in _SCHEMA_NAMES - {config_name}:
        repo.pop(f"{name}.yaml", None)
    hydra_init(config_name)
    _SCHEMA_NAMES.add(config_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # version_base 1.1: what fairseq's @hydra.main (no version_base) runs with
        with initialize_config_dir(config_dir=config_dir, version_base="1.1"):
            cfg = GlobalHydra.instance().hydra.compose_config(
                config_name=config_name,
                overrides=list(overrides),
                run_mode=RunMode.MULTIRUN if multirun else RunMode.RUN,
                from_shell=True,
                with_log_configuration=False,
            )
    with open_dict(cfg):
        hydra_node = cfg.pop("hydra")
    job = OmegaConf.to_container(cfg, enum_to_str=True)
    add_defaults(cfg)  # the registered dataclasses (the plugin is imported, as common.user_dir imports it)
    if resolve:
        with omegaconf_no_object_check():
            cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
        OmegaConf.set_struct(cfg, True)
    merge_optimizer_groups(cfg)
    return Composed(job, cfg, hydra_node)


def merge_optimizer_groups(cfg: DictConfig) -> None:
    """What the composite optimizer merges when it is built: each group's keys (fairseq reads them by
    ``getattr``, so an unknown one would be ignored silently), its optimizer and its scheduler."""
    from fairseq.dataclass.utils import merge_with_parent
    from fairseq.optim.composite import OptimizerAndSchedulerConfig
    from fairseq.registry import REGISTRIES

    optimizer = cfg.get("optimizer")
    if not isinstance(optimizer, DictConfig) or optimizer.get("_name") != "composite":
        return
    allowed = {f.name for f in dataclasses.fields(OptimizerAndSchedulerConfig)}
    for name, group in (optimizer.get("groups") or {}).items():
        unknown = sorted(set(group.keys()) - allowed)
        if unknown:
            raise ValueError(
                f"optimizer.groups.{name}: {unknown} not in OptimizerAndSchedulerConfig {sorted(allowed)}"
            )
        for part in ("optimizer", "lr_scheduler"):
            node = group.get(part)
            registry = REGISTRIES[part]["dataclass_registry"]
            if isinstance(node, DictConfig) and node.get("_name") in registry:
                try:
                    merge_with_parent(registry[node._name](), node)
                except Exception as e:
                    raise ValueError(f"optimizer.groups.{name}.{part}: {e}") from None


def check_user_dir(cfg: DictConfig) -> None:
    """``common.user_dir`` as fairseq imports it, launched from the repository root."""
    from fairseq import utils

    user_dir = cfg.common.get("user_dir") if "common" in cfg else None
    if user_dir:
        with working_directory(REPO):
            utils.import_user_module(argparse.Namespace(user_dir=user_dir))


def hydra_command(tokens: Sequence[str], whole: bool) -> Optional[Composed]:
    """Compose one ``fairseq-hydra-train`` command line; None for a fragment (no --config-name, or ``...``)."""
    args = hydra_cli_args(tokens[1:])
    if args.config_name is None or "..." in tokens:
        return None
    # relative to the launch folder, the repository root; without --config-dir: fairseq's own config folder
    config_dir = (
        os.path.join(REPO, args.config_dir) if args.config_dir else os.path.join(fairseq_dir(), "config")
    )
    if not os.path.isfile(os.path.join(config_dir, args.config_name + ".yaml")):
        raise ValueError(f"no {args.config_name}.yaml in --config-dir {args.config_dir}")
    composed = compose_like_cli(
        os.path.abspath(config_dir), args.config_name, args.overrides, args.multirun, whole
    )
    check_user_dir(composed.cfg)
    return composed


def missing_launcher(tokens: Sequence[str]) -> Optional[str]:
    if any(re.match(r"^hydra/launcher=submitit_\w+$", t) for t in tokens):
        if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
            return "needs hydra-submitit-launcher (the slurm extra)"
    return None


# ----- the other commands -----


def setup_keywords() -> Dict[str, ast.expr]:
    with open(os.path.join(REPO, "setup.py")) as f:
        tree = ast.parse(f.read())
    return {kw.arg: kw.value for node in ast.walk(tree) if isinstance(node, ast.Call) for kw in node.keywords}


def console_scripts() -> Dict[str, str]:
    """setup.py's console scripts: {name: 'module:function'}."""
    entry_points = ast.literal_eval(setup_keywords()["entry_points"])
    return dict((part.strip() for part in s.split("=", 1)) for s in entry_points["console_scripts"])


def extras() -> List[str]:
    return [k.value for k in setup_keywords()["extras_require"].keys]


class _Parsed(Exception):
    pass


def script_main(name: str) -> Callable:
    module, function = console_scripts()[name].split(":")
    return getattr(importlib.import_module(module), function)


def parser_of(name: str) -> argparse.ArgumentParser:
    """The argparse parser of console script ``name``: ``export.build_parser()`` for ``dphubert-export``, else
    the one its ``main`` builds, caught at its ``parse_args`` (nothing else of ``main`` runs)."""
    if name == "dphubert-export":
        return export_cli.build_parser()
    caught = {}

    def catch(self, *args, **kwargs):
        caught["parser"] = self
        raise _Parsed

    with mock.patch.object(argparse.ArgumentParser, "parse_args", catch):
        try:
            script_main(name)([])
        except _Parsed:
            pass
    return caught["parser"]


def help_of_script(name: str) -> Tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            script_main(name)(["--help"])
    except SystemExit as e:
        code = e.code or 0
    return code, out.getvalue(), err.getvalue()


def usage_variants(tokens: Sequence[str]) -> List[List[str]]:
    """The command lines a usage line stands for: ``[optional]`` parts kept, each ``a|b`` choice taken."""
    tokens = [t.strip("[]") for t in tokens]
    choices = [t.split("|") if "|" in t and not t.startswith("-") else [t] for t in tokens if t]
    return [list(v) for v in itertools.product(*choices)]


def argparse_problem(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Optional[str]:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(list(argv))
    except SystemExit:
        return err.getvalue().strip().splitlines()[-1]
    return None


def option_flags(tokens: Sequence[str]) -> List[str]:
    flags = []
    for token in tokens:
        token = token.strip("[]")
        if re.match(r"^--?[A-Za-z][\w-]*(=.*)?$", token):
            flags.append(token.split("=", 1)[0])
    return flags


def unknown_flags(help_text: str, flags: Sequence[str]) -> List[str]:
    return [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", help_text)]


def fairseq_train_problem(tokens: Sequence[str], whole: bool) -> Optional[str]:
    """fairseq-train's argparse route: the plugin as --user-dir (from the repository root), the task, arch and
    criterion arguments added as fairseq adds them; a fragment only needs flags fairseq knows."""
    from fairseq import options

    argv = [t for t in tokens[1:] if t != "..."]
    err = io.StringIO()
    try:
        with working_directory(REPO), contextlib.redirect_stderr(err):
            parser = options.get_training_parser()
            if whole:
                options.parse_args_and_arch(parser, argv)
                return None
            _, extra = options.parse_args_and_arch(parser, argv, parse_known=True)
    except (SystemExit, Exception) as e:  # argparse exits; fairseq raises on an --arch it cannot add (None)
        if whole:
            return (err.getvalue().strip().splitlines() or [f"{type(e).__name__}: {e}"])[-1]
        known = {s for a in options.get_training_parser()._actions for s in a.option_strings}
        extra = [f for f in option_flags(argv) if f not in known]
    unknown = [t for t in extra if t.startswith("-")]
    return f"unknown to fairseq-train: {unknown}" if unknown else None


class CommandChecker:
    """Checks command lines by their first word; ``jobs``: the background subprocesses (``--help`` of the
    modules in HELP_IN_SUBPROCESS)."""

    def __init__(self, docs: Sequence[Doc], placeholders: Dict[str, str], jobs: Dict[str, "Job"]) -> None:
        self.found = Findings()
        self.shell = Shell(placeholders, self.found)
        self.jobs = jobs
        self.scripts = console_scripts()
        self.run_as_written = modules_run_as_written(docs)
        self.helped: Dict[str, Tuple[int, str, str]] = {}
        for command in all_commands(docs):
            tokens = self.shell.tokens(command)
            if tokens is None:
                continue
            for part in split_pipeline(tokens):
                self.check(command, part)

    def count(self, kind: str, command: Command) -> None:
        self.found.counts[f"{kind} ({'fenced' if command.fenced else 'inline'})"] += 1

    def check(self, command: Command, tokens: List[str]) -> None:
        where, text, word = command.where, command.text, tokens[0]
        first = text.split(" ", 1)[0]
        if not (first in COMMAND_WORDS or first.startswith("dphubert-")):  # prose with a $(...): run above
            self.count("$(...) in prose", command)
        elif word == "fairseq-hydra-train":
            reason = missing_launcher(tokens)
            if reason:
                self.found.counts["(skipped) fairseq-hydra-train"] += 1
                self.found.notes.append(f"skipped {where}: {reason}")
                return
            try:
                composed = hydra_command(tokens, command.fenced)
            except Exception as e:
                self.found.fail(where, text, f"{type(e).__name__}: {e}")
                return
            self.count("fairseq-hydra-train composed" if composed else "fairseq-hydra-train named", command)
        elif word == "fairseq-train":
            problem = fairseq_train_problem(tokens, command.fenced)
            if problem:
                self.found.fail(where, text, problem)
            self.count("fairseq-train parsed", command)
        elif word.startswith("dphubert-"):
            self.check_console_script(command, tokens)
        elif word in ("python", "python3"):
            self.check_python(command, tokens)
        elif word == "bash" and len(tokens) > 1:
            path = os.path.join(REPO, tokens[1])
            if not os.path.isfile(path):
                self.found.fail(where, text, f"no file {tokens[1]} in the checkout")
                return
            syntax = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
            if syntax.returncode != 0:
                self.found.fail(where, text, f"bash -n {tokens[1]}: {syntax.stderr}")
            self.count("bash script of ours (exists, bash -n)", command)
        elif word == "pip":
            named = [
                extra
                for token in tokens
                for m in re.finditer(r"(?:^\.|dphubert-fairseq)\[([\w,-]+)\]", token)
                for extra in m.group(1).split(",")
            ]
            missing = [x for x in named if x not in extras()]
            if missing:
                self.found.fail(where, text, f"setup.py has no extra {missing} (extras: {extras()})")
            ours = named or "." in tokens or "dphubert-fairseq" in tokens
            self.count(
                "pip install of ours (extras exist)"
                if named
                else "pip install of ours"
                if ours
                else "not ours: pip",
                command,
            )
        else:
            self.count(f"not ours: {word}", command)

    def help_once(
        self, where: str, what: str, run: Callable[[], Tuple[int, str, str]]
    ) -> Tuple[int, str, str]:
        if what not in self.helped:
            self.helped[what] = run()
            self.found.counts["(--help answered)"] += 1
            code, out, err = self.helped[what]
            if code != 0 or "usage" not in out.lower():
                self.found.fail(where, f"{what} --help", f"exit {code}: {(err or out)[-400:]}")
        return self.helped[what]

    def check_console_script(self, command: Command, tokens: List[str]) -> None:
        where, text, word = command.where, command.text, tokens[0]
        if word not in self.scripts:
            self.found.fail(
                where, text, f"{word} is not a console script of setup.py ({sorted(self.scripts)})"
            )
            return
        self.help_once(where, word, lambda: help_of_script(word))
        parser = parser_of(word)
        if command.fenced:
            for variant in usage_variants(tokens[1:]):
                problem = argparse_problem(parser, variant)
                if problem:
                    self.found.fail(where, text, f"{' '.join(variant)}: {problem}")
        else:
            known = {s for a in parser._actions for s in a.option_strings}
            unknown = [f for f in option_flags(tokens[1:]) if f not in known]
            if unknown:
                self.found.fail(where, text, f"{word} has no {unknown}")
        self.count(f"{word} parsed", command)

    def check_python(self, command: Command, tokens: List[str]) -> None:
        where, text = command.where, command.text
        kind, target, args = python_argv(tokens)
        if kind == "-c":
            code, out, err = run_in_process("-c", target, args)
            if code != 0:
                self.found.fail(where, text, err[-400:])
            self.count("python -c run", command)
            return
        if kind == "-m":
            if target.split(".")[0] not in OUR_PACKAGES:
                self.count(f"not ours: python -m {target.split('.')[0]}", command)
                return
            try:
                spec = importlib.util.find_spec(target)
            except ImportError:
                spec = None
            if spec is None:
                self.found.fail(where, text, f"no module {target}")
                return
            if target in self.run_as_written:  # as the docs run it in $(...); it prints, it has no --help
                code, out, err = run_in_process("-m", target, args)
                if code != 0:
                    self.found.fail(where, text, f"exit {code}: {err[-400:]}")
                self.count("python -m of ours, run as written", command)
                return
            if target in HELP_IN_SUBPROCESS:
                job = self.jobs.get(f"help {target}")
                if job is None:
                    self.found.counts[f"(skipped) python -m {target}"] += 1
                    self.found.notes.append(
                        f"skipped {where}: --help of {target} needs {HELP_IN_SUBPROCESS[target]}"
                    )
                    return
                result = self.help_once(where, f"python -m {target}", job.result)
            else:
                result = self.help_once(
                    where, f"python -m {target}", lambda: run_in_process("-m", target, ["--help"])
                )
            self.count("python -m of ours (--help, flags)", command)
        elif kind == "script":
            path = os.path.abspath(target if os.path.isabs(target) else os.path.join(REPO, target))
            if not os.path.isfile(path):
                self.found.fail(where, text, f"no script {target}")
                return
            result = self.help_once(
                where, f"python {target}", lambda: run_in_process("script", path, ["--help"])
            )
            ours = path.startswith(REPO + os.sep)
            self.count(
                "python script of ours (--help, flags)"
                if ours
                else "not ours: python script (exists, --help, flags)",
                command,
            )
        else:
            self.count("not ours: python", command)
            return
        unknown = unknown_flags(result[1], option_flags(args))
        if unknown:
            self.found.fail(where, text, f"--help names no {unknown}")


# ----- config keys named in prose -----

SECTION_DATACLASSES = {
    "task": DPHuBERTDistillConfig,
    "model": DPHuBERTConfig,
    "criterion": DPHuBERTDistillCriterionConfig,
}
KEY = re.compile(r"^\+?(?P<key>[a-z_]+(?:\.(?:[A-Za-z_]\w*|\{[\w,]+\}))+)(?:[=:<>].*)?$")
BARE = re.compile(r"^[a-z_][a-z0-9_]*$")


def fairseq_sections() -> Dict[str, dataclasses.Field]:
    from fairseq.dataclass.configs import FairseqConfig

    return {f.name: f for f in dataclasses.fields(FairseqConfig)}


def prose_keys(doc: Doc) -> Iterator[Tuple[int, str]]:
    """(line, key) of every config key in ``doc``'s inline code: ``sec.key``, ``sec.key=value``, several in one
    span, and bare names chained to one (`` `criterion.l1_weight` / `cos_weight` ``; in tables also ``, ``)."""
    sections = set(fairseq_sections()) | {"hydra"}
    previous: Optional[Tuple[Span, str]] = None
    for span in doc.spans:
        between = doc.prose[previous[0].end : span.start] if previous else None
        chained = between == " / " or (between == ", " and span.in_table)
        if previous and chained and BARE.match(span.text):
            key = previous[1].rsplit(".", 1)[0] + "." + span.text
            yield span.line, key
            previous = (span, key)
            continue
        previous = None
        for token in span.text.split(" "):
            m = KEY.match(token.strip("'\""))
            if m and m["key"].split(".")[0] in sections:
                yield span.line, m["key"]
                previous = (span, m["key"])


def expand_braces(key: str) -> List[str]:
    m = re.search(r"\{([\w,]+)\}", key)
    if not m:
        return [key]
    return [
        k for alt in m.group(1).split(",") for k in expand_braces(key[: m.start()] + alt + key[m.end() :])
    ]


def registered_dataclasses(section: str) -> Dict[str, type]:
    from fairseq.models import MODEL_DATACLASS_REGISTRY
    from fairseq.registry import REGISTRIES
    from fairseq.tasks import TASK_DATACLASS_REGISTRY

    if section == "task":
        return TASK_DATACLASS_REGISTRY
    if section == "model":
        return MODEL_DATACLASS_REGISTRY
    return REGISTRIES[section]["dataclass_registry"]


def field_names(dc) -> Set[str]:
    return {f.name for f in dataclasses.fields(dc)}


def key_present(node: DictConfig, path: str) -> bool:
    """``path`` is a key of ``node`` (also when its value is None or missing)."""
    parent, _, leaf = path.rpartition(".")
    container = (
        OmegaConf.select(node, parent, default=None, throw_on_resolution_failure=False) if parent else node
    )
    return isinstance(container, DictConfig) and leaf in container


def check_keys(docs: Sequence[Doc], recipes: List[Composed]) -> Findings:
    found = Findings()
    sections = fairseq_sections()
    elsewhere = set()
    for doc in docs:
        for line, written in prose_keys(doc):
            for key in expand_braces(written):
                where, (section, rest) = f"{doc.path}:{line}", key.split(".", 1)
                name = rest.split(".")[0]
                if name in PLACEHOLDER_KEY_NAMES:
                    found.counts["(placeholders, not checked)"] += 1
                elif section in SECTION_DATACLASSES:
                    if name in field_names(SECTION_DATACLASSES[section]):
                        found.counts[f"{section}.* (plugin)"] += 1
                        continue
                    owners = sorted(
                        {
                            dc.__name__
                            for dc in registered_dataclasses(section).values()
                            if dc and name in field_names(dc)
                        }
                    )
                    if owners:
                        found.counts[f"{section}.* (a fairseq dataclass)"] += 1
                        elsewhere.add(f"{key} ({', '.join(owners[:3])}{', ...' if len(owners) > 3 else ''})")
                    else:
                        owner = SECTION_DATACLASSES[section].__name__
                        found.fail(
                            where,
                            key,
                            f"no {name!r} in {owner} nor in any registered fairseq {section} config",
                        )
                elif section == "hydra" and rest.startswith("launcher.") and len(recipes) < 3:
                    found.counts["(hydra.launcher.*: hydra-submitit-launcher not installed)"] += 1
                elif section in ("optimizer", "lr_scheduler", "hydra"):
                    nodes = [(r.hydra, rest) if section == "hydra" else (r.cfg, key) for r in recipes]
                    if any(key_present(node, path) for node, path in nodes):
                        found.counts[f"{section}.* (composed recipes)"] += 1
                    else:
                        found.fail(
                            where,
                            key,
                            "not in the composed recipe configs (stage 1, stage 2, SLURM launcher)",
                        )
                else:
                    f = sections[section]
                    default = (
                        f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                    )
                    if dataclasses.is_dataclass(default) and name in field_names(default):
                        found.counts[f"{section}.* (FairseqConfig)"] += 1
                    else:
                        found.fail(where, key, f"no {name!r} in fairseq's {type(default).__name__}")
    found.notes += [f"in a fairseq dataclass, not the plugin's: {k}" for k in sorted(elsewhere)]
    return found


# ----- links -----


def github_slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(doc: Doc) -> Set[str]:
    """GitHub's heading anchors of a page (not the ``#`` lines of fenced blocks; a repeated heading gets -1, -2,
    ...)."""
    seen: Counter = Counter()
    out = set()
    for line in doc.prose.split("\n"):
        m = HEADING.match(line)
        if m:
            slug = github_slug(m.group(1))
            out.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
            seen[slug] += 1
    return out


def check_links(docs: Sequence[Doc]) -> Findings:
    found = Findings()
    for doc in docs:
        prose = list(doc.prose)
        for span in doc.spans:  # a link inside inline code is no link
            for i in range(span.start, span.end):
                if prose[i] != "\n":
                    prose[i] = " "
        for m in LINK.finditer("".join(prose)):
            target, where = m.group(1), f"{doc.path}:{doc.line_of(m.start())}"
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                found.counts["(external, not checked)"] += 1
                continue
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(REPO, os.path.dirname(doc.path), path))
            if path and not os.path.exists(full):
                found.fail(where, target, f"no {os.path.relpath(full, REPO)}")
                continue
            if not anchor:
                found.counts["to a file or folder"] += 1
                continue
            page = (
                doc if not path else read_doc(os.path.relpath(full, REPO)) if full.endswith(".md") else None
            )
            if page is not None and anchor in anchors(page):
                found.counts["to a heading"] += 1
            else:
                known = sorted(anchors(page)) if page else "none"
                found.fail(
                    where,
                    target,
                    f"no heading #{anchor} in {page.path if page else path} (anchors: {known})",
                    1000,
                )
    return found


# ----- python blocks -----


def python_blocks(docs: Sequence[Doc]) -> List[Block]:
    return [b for d in docs for b in d.blocks if b.lang in PYTHON_LANGS]


def split_names(value: str) -> List[str]:
    return [n.strip() for n in value.split(",") if n.strip()]


def block_skip(block: Block) -> Optional[str]:
    if "skip" in block.directives:
        return block.directives["skip"] or "(no reason given)"
    missing = [
        m for m in split_names(block.directives.get("needs", "")) if importlib.util.find_spec(m) is None
    ]
    return f"needs {', '.join(missing)} (not installed)" if missing else None


def block_key(block: Block) -> str:
    return repr((block.text, sorted(block.directives.items())))


def block_error(block: Block, stderr: str) -> str:
    """The block's traceback from its last frame in ``block.py`` on, that frame named by its doc line."""
    tail = (
        stderr[stderr.rfind("Traceback (most recent call last):") :]
        if "Traceback" in stderr
        else stderr[-1000:]
    )
    frames = list(re.finditer(r'File "block\.py", line (\d+)', tail))
    if frames:
        rest = re.sub(r"^, in [^\n]*", "", tail[frames[-1].end() :])
        tail = f"{block.doc}:{block.line + int(frames[-1].group(1))}: " + rest
    return one_line(tail, 1200)


DRIVER = """\
import random, runpy
import numpy, torch
random.seed(0); numpy.random.seed(0); torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
given = {{}}
{given}
runpy.run_path("block.py", init_globals=given, run_name="__main__")
"""


# ----- fixtures -----


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A tiny fairseq HuBERT teacher (``hubert_base_ls960.pt``), a tiny exported student (``dphubert.pt``), a
    manifests folder (``MANIFESTS``) and a labelled one (``LABELLED``: manifests, letters, their dictionary)."""
    root = tmp_path_factory.mktemp("docs_sandbox")
    teacher = helpers.make_teacher(str(root / "teacher" / "hubert_base_ls960.pt"), "hubert", "tiny", seed=0)
    student = dp.prune(
        helpers.randomise_gates(dp.student_from_teacher(teacher, ("conv", "head", "interm"))).eval()
    )
    exported = dp.save_model(student, str(root / "student" / "dphubert.pt"))
    rng = np.random.default_rng(0)
    for name in ("manifests", "labelled"):
        folder = root / name
        (folder / "audio").mkdir(parents=True)
        sf.write(folder / "audio" / "0.wav", (rng.standard_normal(16000) * 0.1).astype("float32"), 16000)
        for split in ("train", "valid"):
            (folder / f"{split}.tsv").write_text(f"{folder / 'audio'}\n0.wav\t16000\n")
    helpers.write_letter_labels(str(root / "labelled"))
    return {
        "root": str(root),
        "files": {"hubert_base_ls960.pt": teacher, "dphubert.pt": str(exported)},
        "placeholders": {
            "MANIFESTS": str(root / "manifests"),
            "LABELLED": str(root / "labelled"),
            "FAIRSEQ": fairseq_dir(),
            "/path/to/dphubert_fairseq": PLUGIN_DIR,
            "/path/to/dphubert-fairseq": REPO,
        },
    }


@dataclasses.dataclass
class Job:
    what: str
    where: str
    cmd: List[str]
    cwd: str
    log: str
    proc: Optional[subprocess.Popen] = None

    def result(self, timeout: int = 600) -> Tuple[int, str, str]:
        """(exit code, stdout, stderr)."""
        code = self.proc.wait(timeout=timeout)
        with open(self.log, errors="replace") as out, open(self.log + ".err", errors="replace") as err:
            return code, out.read(), err.read()


def readme_command(shell: Shell) -> Tuple[str, List[str]]:
    """README's first fairseq-hydra-train command, placeholders replaced."""
    for command in all_commands(DOCS[:1]):
        if command.fenced and command.text.startswith("fairseq-hydra-train"):
            return command.where, shell.tokens(command)
    raise AssertionError("README.md has no fairseq-hydra-train command")


@pytest.fixture(scope="module")
def background(sandbox):
    """The checks that need a fresh interpreter, started together so that they run while the in-process checks
    do (test_commands asks for this fixture first): every python block (identical ones once), README's first
    command through the real ``fairseq-hydra-train --cfg job``, ``--help`` of the HELP_IN_SUBPROCESS modules."""
    jobs: Dict[str, Job] = {}
    root = os.path.join(sandbox["root"], "jobs")
    os.makedirs(root)
    for i, block in enumerate(python_blocks(DOCS)):
        if block_key(block) in jobs or block_skip(block):
            continue
        names = split_names(block.directives.get("given", ""))
        unknown = [n for n in names if n not in GIVEN]
        assert not unknown, f"{block.where()}: doc-test given: {unknown} unknown; known: {sorted(GIVEN)}"
        folder = os.path.join(root, f"block{i}")
        os.makedirs(folder)
        for name, path in sandbox["files"].items():
            shutil.copy(path, os.path.join(folder, name))
        with open(os.path.join(folder, "block.py"), "w") as f:
            f.write(block.text + "\n")
        driver = DRIVER.format(given="\n".join(GIVEN[n] for n in names))
        log = os.path.join(folder, "log.txt")
        jobs[block_key(block)] = Job(
            "python block", block.where(), NICE + [sys.executable, "-c", driver], folder, log
        )
    where, tokens = readme_command(Shell(sandbox["placeholders"], Findings()))
    cli = helpers.bin_or_module("fairseq-hydra-train", "fairseq_cli.hydra_train")
    jobs["cfg job"] = Job(
        "--cfg job",
        where,
        NICE + cli + tokens[1:] + ["--cfg", "job"],
        REPO,
        os.path.join(root, "cfg_job.txt"),
    )
    for module, needs in HELP_IN_SUBPROCESS.items():
        if all(importlib.util.find_spec(m) is not None for m in needs):
            cmd = NICE + [sys.executable, "-m", module, "--help"]
            jobs[f"help {module}"] = Job(
                "--help", module, cmd, root, os.path.join(root, f"help_{module}.txt")
            )
    for job in jobs.values():
        with open(job.log, "w") as out, open(job.log + ".err", "w") as err:
            env = helpers.checkout_env(SUBPROCESS_ENV)
            job.proc = subprocess.Popen(job.cmd, cwd=job.cwd, env=env, stdout=out, stderr=err)
    yield jobs
    for job in jobs.values():
        if job.proc.poll() is None:
            job.proc.kill()
            job.proc.wait()


@pytest.fixture(scope="module")
def recipes(sandbox) -> List[Composed]:
    """The recipe configs composed (stage 1, stage 2, and stage 1 with the SLURM launcher when installed)."""
    configs = os.path.join(REPO, "configs")
    base = [
        f"task.data={sandbox['placeholders']['MANIFESTS']}",
        "task.teacher_path=t.pt",
        "checkpoint.save_dir=out",
    ]
    composed = [
        compose_like_cli(configs, "dphubert", base, False),
        compose_like_cli(configs, "dphubert_final", base + ["task.student_path=s.pt"], False),
    ]
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None:
        composed.append(compose_like_cli(configs, "dphubert", base + ["hydra/launcher=submitit_slurm"], True))
    return composed


# ----- the tests -----


def test_commands(sandbox, background):
    """1 and 2: every command of a shell block, and every command written inline in prose, checked by kind."""
    checker = CommandChecker(DOCS, sandbox["placeholders"], background)
    checker.found.record("commands")
    checker.found.check()


def test_in_process_composition_matches_fairseq_hydra_train(sandbox, background):
    """README's first command through the real ``fairseq-hydra-train ... --cfg job``: it prints the job config
    test_commands composes in this process (evidence that the in-process route is fairseq's)."""
    job = background["cfg job"]
    code, out, err = job.result()
    assert code == 0, f"{job.where}: {' '.join(job.cmd)} failed:\n{err[-3000:]}"
    where, tokens = readme_command(Shell(sandbox["placeholders"], Findings()))
    composed = hydra_command(tokens, whole=True)
    assert composed.job == yaml.safe_load(out), f"{where}: composed here != fairseq-hydra-train --cfg job"
    assert composed.cfg.task._name == "dphubert_distill" and "teacher_path" in composed.cfg.task
    SUMMARY["cfg job"] = [f"fairseq-hydra-train --cfg job of {where} == its in-process composition"]


def test_config_keys_in_prose_exist(recipes):
    """3: every config key named in prose exists."""
    found = check_keys(DOCS, recipes)
    found.record("config keys in prose")
    found.check()


def test_python_blocks_run(background):
    """4: every python block runs in a fresh interpreter on tiny models, or is skipped by a directive."""
    found = Findings()
    for block in python_blocks(DOCS):
        reason = block_skip(block)
        if reason:
            found.counts["(skipped)"] += 1
            found.notes.append(f"skipped {block.where()}: {reason}")
            continue
        code, out, err = background[block_key(block)].result()
        if code != 0:
            found.failures.append(f"{block.where()}: ```python block fails: {block_error(block, err)}")
        found.counts["run"] += 1
    found.notes.append(
        f"{sum(j.what == 'python block' for j in background.values())} fresh interpreters (identical blocks run once)"
    )
    found.record("python blocks")
    found.check()


def test_doc_test_directives_sit_on_fences():
    stray = [f"{d.path}:{n}" for d in DOCS for n in d.stray_directives]
    assert not stray, f"doc-test comments that are not right above a fence: {stray}"
    unknown = [
        f"{b.where()}: {k}" for d in DOCS for b in d.blocks for k in b.directives if k not in DIRECTIVES
    ]
    assert not unknown, f"unknown doc-test directives (known: {DIRECTIVES}): {unknown}"
    unreasoned = [
        b.where() for d in DOCS for b in d.blocks if "skip" in b.directives and not b.directives["skip"]
    ]
    assert not unreasoned, f"doc-test: skip without a reason: {unreasoned}"


def test_links_resolve():
    """5: every relative link and anchor resolves."""
    found = check_links(DOCS)
    found.record("links")
    found.check()


ROTTEN = """\
# A page

## Some heading

```bash
fairseq-hydra-train --config-dir configs --config-name dphubert \\
  task.data=MANIFESTS task.teacher_path=t.pt checkpoint.save_dir=out criterion.target_sparsty=0.5
fairseq-hydra-train --config-dir configs --config-name dphubert \\
  task.data=MANIFESTS task.teacher_path=t.pt checkpoint.save_dir=out +criterion.typo=1
fairseq-hydra-train --config-dir configs --config-name dphubert task.data=MANIFESTS \\
  task.teacher_path=t.pt checkpoint.save_dir=out +optimizer.groups.default.lr_flaot=0.1  # silently unused
dphubert-export out/checkpoint_last.pt x.pt --jsn x.json
python -m dphubert_fairseq.no_such_module
bash examples/no_such_script.sh
pip install -e ".[no_such_extra]"
```

`task.teacher_pth`, `criterion.l1_weight` / `cos_wieght`, `fairseq-train DATA --user-dir dphubert_fairseq
--task dphubert_distill --teacher-pth T.pt`, [here](../README.md#no-such-heading), [fine](#some-heading),
[gone](nothing.md).
"""


def test_rot_is_caught_and_located(sandbox, recipes):
    """The checks fail on a page with one mistake of each kind, each named by the page and its line."""
    doc = parse_doc("docs/rotten.md", ROTTEN)
    failures = CommandChecker([doc], sandbox["placeholders"], {}).found.failures
    failures += check_keys([doc], recipes).failures + check_links([doc]).failures
    expected = {
        "docs/rotten.md:6": "target_sparsty",
        "docs/rotten.md:8": "typo",
        "docs/rotten.md:10": "lr_flaot",
        "docs/rotten.md:12": "--jsn",
        "docs/rotten.md:13": "no module dphubert_fairseq.no_such_module",
        "docs/rotten.md:14": "no file examples/no_such_script.sh",
        "docs/rotten.md:15": "no_such_extra",
    }
    expected.update(
        {
            "docs/rotten.md:18": "task.teacher_pth",
            "docs/rotten.md:18 ": "criterion.cos_wieght",
            "docs/rotten.md:18  ": "--teacher-pth",
            "docs/rotten.md:19": "no heading #no-such-heading in README.md",
            "docs/rotten.md:20": "no docs/nothing.md",
        }
    )
    for where, what in expected.items():
        assert any(f.startswith(where.strip() + ":") and what in f for f in failures), (where, what, failures)
    assert len(failures) == len(expected), failures
