"""mkdocs hook: the site serves its own MathJax, so the docs display offline.

MathJax 3.2.2 comes from PyPI, pinned in the ``docs`` extra (``django-static-mathjax``:
MathJax's own ``es5`` build packaged as static files; nothing of Django is used). The hook
adds the SVG renderer (``tex-svg.js``: no web fonts), the TeX extensions it loads on
demand, its menu and accessibility parts, and MathJax's licence to the site under
``assets/mathjax/``, in ``mkdocs build`` and ``mkdocs serve`` alike.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

MATHJAX_DISTRIBUTION = "django-static-mathjax"
MATHJAX_VERSION = "3.2.2.1"
SITE_FOLDER = "assets/mathjax"
# tex-svg.js bundles TeX input, SVG output and the menu; the rest is loaded on demand.
PARTS = ("tex-svg.js", "input/tex/extensions", "ui", "a11y", "sre")


def mathjax_es5() -> Path:
    """MathJax's ``es5`` folder inside the installed package."""
    try:
        installed = metadata.version(MATHJAX_DISTRIBUTION)
        import mathjax
    except (metadata.PackageNotFoundError, ImportError) as error:
        raise PluginError(
            f"the docs need MathJax from PyPI: pip install -e '.[docs]' "
            f"({MATHJAX_DISTRIBUTION}=={MATHJAX_VERSION})"
        ) from error
    if installed != MATHJAX_VERSION:
        raise PluginError(
            f"{MATHJAX_DISTRIBUTION} {installed} is installed, the docs pin {MATHJAX_VERSION}"
        )
    return Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"


def on_files(files: Files, config) -> Files:
    es5 = mathjax_es5()
    sources = []
    for part in PARTS:
        path = es5 / part
        sources += [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for source in sources:
        relative = source.relative_to(es5).as_posix()
        files.append(_file(relative, es5, config))
    files.append(_file("LICENSE", es5.parent, config))
    return files


def _file(relative: str, folder: Path, config) -> File:
    return File(
        relative,
        src_dir=str(folder),
        dest_dir=config["site_dir"],
        use_directory_urls=config["use_directory_urls"],
        dest_uri=f"{SITE_FOLDER}/{relative}",
    )
