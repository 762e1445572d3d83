"""The README and the docs site: the README stays short, the site builds with ``mkdocs build --strict``, and
every code example in README.md and docs/**/*.md runs as written.

The rules the examples follow (also said on the docs' "Getting started" page):

- every ```` ```python ```` block runs, in a subprocess, in order of the page, in a temporary directory of its
  own page (``HF_HUB_OFFLINE=1``, matplotlib's Agg backend); the README's blocks run first, and every docs page
  starts in a directory holding a copy of the ``logs/`` they wrote (two runs of a tiny random BERT);
- in a ```` ```bash ```` block, every line that starts with ``seo-trainlog`` runs after the page's Python blocks
  (as ``seo_trainlog.cli.main(ARGS)``, all of a page's in one interpreter) and must exit 0; other shell lines (``make``, ``pip``, ``torchrun``) are
  not run;
- a block whose info string has ``title="fragment"`` shows a piece that cannot run alone and is not run; there
  may be at most ``MAX_FRAGMENTS`` of them in all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_BYTES = 10 * 1024
MAX_FRAGMENTS = 8
EXAMPLE_TIMEOUT_S = 600  # a tiny model trained twice: about 30 s on a loaded 2-core machine

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.MULTILINE | re.DOTALL)
CLI = "seo-trainlog"
EXIT_CODES = "seo-trainlog exit codes: "
CLI_DRIVER = f"""
import json, sys
from seo_trainlog.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    try:
        codes.append(main(argv))
    except SystemExit as stop:   # argparse: a wrong option
        codes.append(stop.code)
print({EXIT_CODES!r} + json.dumps(codes), flush=True)
"""


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    fragment: bool
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path}:{self.line}"

    def cli_lines(self) -> list[str]:
        if self.lang not in ("bash", "sh", "shell") or self.fragment:
            return []
        return [line.strip() for line in self.code.splitlines() if line.strip().startswith(CLI + " ")]


def blocks_of(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        indent = match["indent"]
        body = "".join(line[len(indent):] if line.startswith(indent) else line
                       for line in match["body"].splitlines(keepends=True))
        found.append(Block(path, text.count("\n", 0, match.start()) + 1, match["lang"].lower(),
                           'title="fragment"' in match["info"], textwrap.dedent(body)))
    return found


def doc_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def example_env() -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("SEO_TRAINLOG_")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def run_examples(blocks: list[Block], workdir: Path, skip_code: frozenset[str] = frozenset()) -> list[str]:
    """Run the Python blocks, then the ``seo-trainlog`` lines, in ``workdir``; the failures, one text each."""
    failures = []
    env = example_env()
    for number, block in enumerate(blocks):
        if block.lang != "python" or block.fragment or block.code in skip_code:
            continue
        script = workdir / f"example_{number}.py"
        script.write_text(block.code, encoding="utf-8")
        done = subprocess.run([sys.executable, str(script)], cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=EXAMPLE_TIMEOUT_S)
        if done.returncode != 0:
            failures.append(f"{block.where}: python block exited {done.returncode}\n{block.code}\n"
                            f"--- stderr (end) ---\n{done.stderr[-3000:]}")
    commands = [(block, line) for block in blocks for line in block.cli_lines()]
    if commands:  # one interpreter for all of them: `seo-trainlog ARGS` is `seo_trainlog.cli.main(ARGS)`
        argvs = [shlex.split(line, comments=True)[1:] for _, line in commands]
        done = subprocess.run([sys.executable, "-c", CLI_DRIVER, json.dumps(argvs)], cwd=workdir, env=env,
                              capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S)
        marked = [line for line in done.stdout.splitlines() if line.startswith(EXIT_CODES)]
        codes = json.loads(marked[-1][len(EXIT_CODES):]) if marked else [None] * len(commands)
        for (block, line), code in zip(commands, codes):
            if code != 0:
                failures.append(f"{block.where}: `{line}` exited {code}\n{done.stderr[-2000:]}")
    return failures


@pytest.fixture(scope="module")
def readme_logs(tmp_path_factory) -> Path:
    """The README's examples run in a fresh directory; its logs/ is what every docs page starts with."""
    workdir = tmp_path_factory.mktemp("readme")
    failures = run_examples(blocks_of(README), workdir)
    assert not failures, "\n\n".join(failures)
    return workdir / "logs"


def test_readme_is_at_most_10_kb():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, more than {README_MAX_BYTES}"


def test_readme_examples_run_and_write_two_runs(readme_logs):
    blocks = blocks_of(README)
    assert sum(block.lang == "python" and not block.fragment for block in blocks) >= 1
    assert {line.split()[1] for block in blocks for line in block.cli_lines()} >= {"summarize", "plot", "report"}
    runs = sorted(path.name for path in readme_logs.glob("performance_metrics_*.log"))
    assert len(runs) == 2, runs
    events = [[json.loads(line)["event"] for line in (readme_logs / name).read_text(encoding="utf-8").splitlines()]
              for name in runs]
    assert [run.count("train") for run in events] == [4, 4]   # max_steps=8, logging_steps=2
    assert [run.count("summary") for run in events] == [1, 1]
    assert events[1][-1] == "test_result" and "test_result" not in events[0]   # the TrainLogger's own record


def test_readme_links_point_at_files():
    links = re.findall(r"\]\((?!https?://|#)([^)#\s]+)", README.read_text(encoding="utf-8"))
    assert any(link.startswith("docs/") for link in links)
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_readme_picture_is_a_small_png():
    pictures = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", README.read_text(encoding="utf-8"))
    assert pictures, "README.md has no picture"
    for picture in pictures:
        data = (ROOT / picture).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200 * 1024, picture


@pytest.mark.parametrize("page", doc_pages(), ids=lambda page: str(page.relative_to(DOCS)))
def test_docs_page_examples_run(page, readme_logs, tmp_path):
    shutil.copytree(readme_logs, tmp_path / "logs")
    already_run = frozenset(block.code for block in blocks_of(README) if block.lang == "python")
    failures = run_examples(blocks_of(page), tmp_path, skip_code=already_run)
    assert not failures, "\n\n".join(failures)


def test_fragments_are_few():
    fragments = [block.where for path in [README, *doc_pages()] for block in blocks_of(path) if block.fragment]
    assert len(fragments) <= MAX_FRAGMENTS, fragments


def test_a_broken_example_fails(tmp_path):
    page = tmp_path / "broken.md"
    page.write_text("Text.\n\n```python\nimport seo_trainlog\nraise SystemExit(3)\n```\n\n"
                    "```python title=\"fragment\"\nthis is not python\n```\n\n"
                    "```bash\nseo-trainlog summarize no-such-directory   # exits 2\nmake train\n```\n",
                    encoding="utf-8")
    blocks = blocks_of(page)
    assert [(block.lang, block.fragment) for block in blocks] == [("python", False), ("python", True),
                                                                   ("bash", False)]
    failures = run_examples(blocks, tmp_path)
    assert len(failures) == 2, failures
    assert "python block exited 3" in failures[0]
    assert "`seo-trainlog summarize no-such-directory   # exits 2` exited 2" in failures[1]


def test_every_setting_is_documented():
    from seo_trainlog import LogConfig
    from seo_trainlog._config import _ENV_FIELDS

    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    missing = [f"`{field.name}`" for field in dataclasses.fields(LogConfig) if f"`{field.name}`" not in page]
    missing += [f"`{variable}`" for variable, _ in _ENV_FIELDS if f"`{variable}`" not in page]
    assert not missing, f"docs/configuration.md does not document {missing}"


def test_docs_site_builds_strictly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("seo_trainlog._config.LogConfig", "seo_trainlog.record.logger.TrainLogger",
                 "seo_trainlog.record.callback.TrainLogCallback", "seo_trainlog.watch.collator.TimedDataCollator",
                 "seo_trainlog.record.tracker.SeoTrainlogTracker", "seo_trainlog.record.sinks.logger"):
        assert f'id="{name}"' in api, name


def test_code_named_in_the_docs_exists():
    """Every ``seo_trainlog/...py`` file the docs name exists, and in the design page's table of where each number
    is computed, every class or function named next to a file is defined in that file."""
    pages = {path: path.read_text(encoding="utf-8") for path in [README, *doc_pages()]}
    named = {(path.name, name) for path, text in pages.items() for name in re.findall(r"seo_trainlog/[\w/]+\.py", text)}
    assert not [(page, name) for page, name in named if not (ROOT / name).is_file()]
    table = pages[DOCS / "design.md"].split("## Where each number is computed", 1)[1].split("\n## ", 1)[0]
    checked = 0
    for row in (line for line in table.splitlines()[2:] if line.startswith("| ") and " | " in line[2:]):
        where = row.split(" | ", 1)[1]
        for part in re.split(r"(?=`seo_trainlog/)", where):
            file = re.match(r"`(seo_trainlog/[\w/]+\.py)`", part)
            if not file:
                continue
            source = (ROOT / file[1]).read_text(encoding="utf-8")
            for name in re.findall(r"`([A-Z]\w+|[a-z_]+(?=`, |`\)|`; )|\w+\.\w+)`", part[file.end():]):
                last = name.split(".")[-1]
                assert re.search(rf"^\s*(?:class|def) {last}\b|^{last}\b.*=", source, re.MULTILINE), (file[1], name)
                checked += 1
    assert checked >= 15, checked
