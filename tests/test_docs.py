"""Every ```python block of docs/**/*.md and README.md runs.

The blocks of one page run in order in one namespace (a later block may use names from
an earlier one), in a temporary working directory. A block opts out only with the
marker ``<!-- skip-test: reason -->`` on the last non-blank line before its opening
fence. Blocks in other languages (bash, text, ...) are never run. A block that needs an
optional package which is not installed (pml's ``logging_presets`` needs record-keeper
and tensorboard, which the ``test`` extra installs) is not run: the page's test then runs
its other blocks and is reported as skipped, naming them (under ``CI`` it fails).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PYTHON_LANGUAGES = {"python", "py", "python3"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
SKIP = re.compile(r"^\s*<!--\s*skip-test:\s*(?P<reason>\S.*?)\s*-->\s*$")
SKIP_PREFIX = re.compile(r"<!--\s*skip-test")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    skip_reason: str | None


def markdown_pages() -> list[Path]:
    pages = sorted(DOCS.rglob("*.md"))
    readme = ROOT / "README.md"
    if readme.is_file():
        pages.append(readme)
    return pages


def code_blocks(path: Path) -> list[Block]:
    """Fenced code blocks of a Markdown file (indented fences, e.g. in admonitions, too)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    i = 0
    last_text = ""  # last non-blank line before the current position
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            if lines[i].strip():
                last_text = lines[i]
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        info = opening["info"].strip().lstrip("{").strip()
        language = info.split()[0].lstrip(".").lower() if info else ""
        body = []
        j = i + 1
        while j < len(lines):
            closing = FENCE.match(lines[j])
            if (
                closing
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"].strip()
            ):
                break
            body.append(lines[j])
            j += 1
        code = textwrap.dedent("\n".join(body)) if indent else "\n".join(body)
        skip = SKIP.match(last_text)
        blocks.append(Block(path, i + 1, language, code, skip["reason"] if skip else None))
        last_text = lines[j] if j < len(lines) else ""
        i = j + 1
    return blocks


def python_blocks(path: Path) -> list[Block]:
    return [b for b in code_blocks(path) if b.language in PYTHON_LANGUAGES]


PAGES_WITH_PYTHON = [p for p in markdown_pages() if python_blocks(p)]


# Optional packages a block needs, recognised by what its code uses.
OPTIONAL_PACKAGES = {re.compile(r"\blogging_presets\b"): ("record_keeper", "tensorboard")}


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_packages(code: str, is_importable: Callable[[str], bool] = importable) -> list[str]:
    """The optional packages ``code`` needs that are not installed."""
    missing: list[str] = []
    for pattern, modules in OPTIONAL_PACKAGES.items():
        if pattern.search(code):
            missing += [m for m in modules if m not in missing and not is_importable(m)]
    return missing


def run_page(page: Path, is_importable: Callable[[str], bool] = importable) -> list[str]:
    """Run the python blocks of ``page`` in one namespace; return the blocks not run for a
    missing optional package (``"page:line (needs ...)"``)."""
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    not_run = []
    for block in python_blocks(page):
        if block.skip_reason is not None:
            continue
        where = f"{_page_id(page)}:{block.line}"
        missing = missing_packages(block.code, is_importable)
        if missing:
            not_run.append(f"{where} (needs {', '.join(missing)})")
            continue
        try:
            compiled = compile(block.code, where, "exec")
        except SyntaxError as error:
            pytest.fail(f"{where}: python block does not compile: {error}")
        try:
            exec(compiled, namespace)
        except Exception as error:  # noqa: BLE001 - report which block failed
            raise AssertionError(f"{where}: python block raised {error!r}") from error
    return not_run


def _page_id(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return path.name


@pytest.mark.parametrize("page", PAGES_WITH_PYTHON, ids=_page_id)
def test_python_blocks_run(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    import logging

    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    # pages may quieten pml's logging; give the next tests the level they had
    root = logging.getLogger()
    request.addfinalizer(lambda level=root.level: root.setLevel(level))
    not_run = run_page(page)
    import matplotlib.pyplot as plt

    plt.close("all")
    if not_run:
        message = f"not run: {'; '.join(not_run)} (pip install -e '.[test]')"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_blocks_needing_a_missing_package_are_not_run(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nbefore = 1\n```\n\n"
        "```python\nfrom pytorch_metric_learning.utils import logging_presets\n"
        "raise RuntimeError('ran without tensorboard')\n```\n\n"
        "```python\nassert before == 1\nafter = 2\n```\n",
        encoding="utf-8",
    )
    assert run_page(page, lambda module: module != "tensorboard") == [
        "page.md:5 (needs tensorboard)"
    ]
    with pytest.raises(AssertionError, match="ran without tensorboard"):
        run_page(page, lambda module: True)


def test_the_logging_blocks_of_the_docs_need_record_keeper_and_tensorboard() -> None:
    needing = [
        f"{_page_id(b.path)}:{b.line}"
        for page in PAGES_WITH_PYTHON
        for b in python_blocks(page)
        if missing_packages(b.code, lambda module: False)
    ]
    assert {n.split(":")[0] for n in needing} >= {
        "docs/how-to/trainers.md",
        "docs/how-to/evaluate-opis.md",
    }
    for page in PAGES_WITH_PYTHON:
        for b in python_blocks(page):
            if "logging_presets" in b.code:
                assert missing_packages(b.code, lambda module: False) == [
                    "record_keeper",
                    "tensorboard",
                ]


def test_collector_finds_the_pages() -> None:
    pages = {_page_id(p) for p in PAGES_WITH_PYTHON}
    assert "docs/index.md" in pages
    assert "docs/concepts.md" in pages
    assert sum(len(python_blocks(p)) for p in PAGES_WITH_PYTHON) >= 10


def test_skip_markers_are_well_formed_and_sparing() -> None:
    """Every skip marker names a reason and sits right before a code block."""
    skipped = []
    for page in markdown_pages():
        lines = page.read_text(encoding="utf-8").splitlines()
        marked = {n for n, line in enumerate(lines, 1) if SKIP_PREFIX.search(line)}
        for n in marked:
            assert SKIP.match(lines[n - 1]), f"{_page_id(page)}:{n}: skip marker needs a reason"
        used = set()
        for block in code_blocks(page):
            if block.skip_reason is not None:
                # the marker is the last non-blank line before the fence
                k = block.line - 1
                while not lines[k - 1].strip():
                    k -= 1
                used.add(k)
                skipped.append(f"{_page_id(page)}:{block.line}")
        assert marked == used, f"{_page_id(page)}: skip marker not followed by a code block"
    python = [b for p in markdown_pages() for b in python_blocks(p)]
    python_skipped = [b for b in python if b.skip_reason is not None]
    assert len(python_skipped) <= max(3, len(python) // 5), f"too many skipped blocks: {skipped}"


def test_collector_parses_fences_and_markers(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\na = 1\n```\n\n<!-- skip-test: needs 2 processes -->\n\n"
        "```python\nraise SystemExit\n```\n\n```bash\nexit 1\n```\n\n"
        "!!! note\n    ```py\n    b = a + 1\n    ```\n\n````markdown\n```python\nx\n```\n````\n",
        encoding="utf-8",
    )
    blocks = code_blocks(page)
    assert [b.language for b in blocks] == ["python", "python", "bash", "py", "markdown"]
    assert [b.skip_reason for b in blocks] == [None, "needs 2 processes", None, None, None]
    assert blocks[3].code == "b = a + 1"
    assert blocks[4].code == "```python\nx\n```"


def test_every_public_name_is_in_the_api_reference() -> None:
    import pml_tcm
    import pml_tcm.functional

    reference = "\n".join(p.read_text(encoding="utf-8") for p in (DOCS / "reference").glob("*.md"))
    directives = re.findall(r"^::: *(\S+)", reference, flags=re.MULTILINE)
    documented_members = set(re.findall(r"members: *\[([^\]]*)\]", reference))
    members = {m.strip() for group in documented_members for m in group.split(",")}
    names = {d.rsplit(".", 1)[-1] for d in directives} | members
    for name in pml_tcm.__all__:
        if name != "__version__":
            assert name in names, f"pml_tcm.{name} is missing from docs/reference"
    for name in pml_tcm.functional.__all__:
        assert name in names, f"pml_tcm.functional.{name} is missing from docs/reference"


@pytest.fixture(scope="module")
def built_site(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess]:
    """The site as ``mkdocs build --strict`` writes it, built once for this module."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path_factory.mktemp("site")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    return site, run


def test_mkdocs_build_strict(built_site) -> None:
    _, run = built_site
    assert run.returncode == 0, run.stderr[-4000:]
    warnings = [line for line in run.stderr.splitlines() if line.startswith("WARNING")]
    assert not warnings, "\n".join(warnings)


class _References(HTMLParser):
    """Every URL an HTML page makes the browser load: scripts, stylesheets, fonts, icons,
    preloads, and ``url()`` / ``@import`` inside ``<style>`` and ``style=``."""

    LOADING_RELS = {"stylesheet", "preload", "modulepreload", "preconnect", "dns-prefetch",
                    "icon", "shortcut", "apple-touch-icon", "manifest", "prefetch"}  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag in {"script", "img", "iframe", "audio", "video", "source"} and values.get("src"):
            self.urls.append(values["src"])
        if tag == "link" and set(values.get("rel", "").lower().split()) & self.LOADING_RELS:
            self.urls.append(values.get("href", ""))
        if "style" in values:
            self.urls += css_urls(values["style"])
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.urls += css_urls(data)


def css_urls(css: str) -> list[str]:
    """The targets of ``url(...)`` and ``@import "..."`` in CSS."""
    found = re.findall(r"url\(\s*['\"]?([^'\")]+)", css)
    return found + re.findall(r"@import\s+['\"]([^'\"]+)", css)


def is_external(url: str) -> bool:
    return url.strip().lower().startswith(("http:", "https:", "//"))


def test_built_site_loads_nothing_from_another_host(built_site) -> None:
    site, run = built_site
    assert run.returncode == 0, run.stderr[-4000:]
    external = []
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 10
    for page in pages:
        parser = _References()
        parser.feed(page.read_text(encoding="utf-8"))
        external += [f"{page.relative_to(site)}: {url}" for url in parser.urls if is_external(url)]
    for sheet in site.rglob("*.css"):
        urls = css_urls(sheet.read_text(encoding="utf-8", errors="replace"))
        external += [f"{sheet.relative_to(site)}: {url}" for url in urls if is_external(url)]
    assert not external, "\n".join(external[:20])
    assert (site / "assets" / "mathjax" / "tex-svg.js").is_file()  # served by the site


CHROMIUM_NAMES = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def test_concepts_formulas_are_typeset_offline_in_headless_chromium(built_site) -> None:
    """The browser may reach no host (every name resolves to nothing): the formulas are
    typeset only if the site serves its own MathJax."""
    site, run = built_site
    assert run.returncode == 0, run.stderr[-4000:]
    browser = next((shutil.which(name) for name in CHROMIUM_NAMES if shutil.which(name)), None)
    if browser is None:
        message = "no headless Chromium: apt-get install chromium-headless-shell"
        if os.environ.get("CI"):
            pytest.fail(message)  # .ci/run installs it
        pytest.skip(message)
    page = site / "concepts" / "index.html"
    formulas = page.read_text(encoding="utf-8").count('class="arithmatex"')
    assert formulas >= 50
    dom = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--virtual-time-budget=20000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout
    typeset = re.findall(r"<mjx-container[^>]*>(.*?)</mjx-container>", dom, flags=re.DOTALL)
    assert len(typeset) == formulas, f"{len(typeset)} of {formulas} formulas typeset"
    assert all(part.lstrip().startswith("<svg") for part in typeset)
    assert '<g data-mml-node="merror"' not in dom  # no TeX error boxes


def test_every_cli_option_is_in_the_cli_reference() -> None:
    from pml_tcm.cli import build_parser

    page = (DOCS / "reference" / "cli.md").read_text(encoding="utf-8")
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    for name, subparser in subcommands.items():
        assert f"`pml-tcm {name}`" in page, f"pml-tcm {name} is missing from the CLI reference"
        for action in subparser._actions:
            if action.dest == "help":
                continue
            shown = action.option_strings[-1] if action.option_strings else action.dest
            assert f"`{shown}" in page, f"pml-tcm {name} {shown} is missing from the CLI reference"


# --- the README is a front page --------------------------------------------------------

README = ROOT / "README.md"
TEST_COMMAND = 'python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e ".[dev]" && .venv/bin/python -m pytest -q'  # noqa: E501
OLDEST_PML_COMMAND = 'python3 -m venv .venv-oldpml && .venv-oldpml/bin/pip install -q torch==2.13.0 && .venv-oldpml/bin/pip install -q -e ".[dev]" "pytorch-metric-learning==2.7.0" && .venv-oldpml/bin/python -m pytest -q'  # noqa: E501
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def _readme_command(marker: str) -> str:
    """The first line of the first ```bash block after the marker, as .ci/run reads it."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if f"<!-- {marker} (" in line)
    fence = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```bash"))
    return lines[fence + 1]


def test_readme_keeps_the_ci_test_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert "<!-- test-command (run verbatim by .ci/run) -->\n```bash\n" in text
    assert "<!-- test-command-oldest-pml (run verbatim by .ci/run) -->\n```bash\n" in text
    assert _readme_command("test-command") == TEST_COMMAND
    assert _readme_command("test-command-oldest-pml") == OLDEST_PML_COMMAND
    run = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "readme_command test-command)" in run and "readme_command test-command-oldest-pml" in run


def test_readme_is_a_front_page() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 160
    text = "\n".join(lines)
    assert "one threshold" in text  # what it is for, before the code
    assert text.index("one threshold") < text.index("## 60-second usage")
    assert "weight=" in text[text.index("## 60-second usage") :].split("\n## ")[0]
    tables = [i for i, line in enumerate(lines) if re.match(r"^\|(-+\|)+$", line)]
    assert len(tables) == 2, "components and headline numbers only; benchmarks in docs/"


def test_readme_cpu_only_torch_is_next_to_the_command_it_changes() -> None:
    bash = [b.code for b in code_blocks(README) if b.language == "bash"]
    first = next(i for i, code in enumerate(bash) if "torch==2.13.0" in code)
    assert CPU_INDEX not in bash[first]
    assert bash[first + 1] == bash[first].replace("torch==2.13.0", f"torch==2.13.0 {CPU_INDEX}", 1)
    text = README.read_text(encoding="utf-8")
    between = text[text.index(bash[first]) : text.index(bash[first + 1])]
    assert "CUDA build" in between


def test_readme_cites_no_torch_or_pml_outside_pyproject() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    (torch_bound,) = [d for d in project["dependencies"] if d.startswith("torch")]
    lowest = tuple(int(p) for p in torch_bound.removeprefix("torch>=").split("."))
    text = README.read_text(encoding="utf-8")
    for cited in re.findall(r"torch[ =]=?(\d+\.\d+)", text):
        assert tuple(int(p) for p in cited.split(".")) >= lowest, f"torch {cited} cited"
    assert "pytorch-metric-learning>=2.7,<3" in project["dependencies"]
    assert "pytorch-metric-learning>=2.7,<3" in text


def test_readme_links_resolve() -> None:
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(#[^)\s]+)?\)", text)
    local = [(target, anchor) for target, anchor in links if not is_external(target)]
    assert len(local) >= 5
    for target, anchor in local:
        path = ROOT / target
        assert path.is_file(), f"README links to missing {target}"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), flags=re.M)
            # a heading's id: its explicit attr_list id ("{ #name }"), else its slug
            explicit = {m.group(1) for h in headings if (m := re.search(r"\{ *#([\w-]+) *\}", h))}
            slugs = explicit | {
                re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings
            }
            assert anchor[1:] in slugs, f"README links to missing {target}{anchor}"
