"""The documentation: the site builds with ``mkdocs build --strict`` (a broken link, a missing anchor, a page left out
of the nav or a docstring the API reference cannot parse fails it), its configuration reference is generated from the
code, and the README stays a front door (at most 250 lines, every relative link resolving)."""

from __future__ import annotations

import dataclasses
import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def build(config_dir: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's end-of-life banner
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config_dir / "mkdocs.yml"),
                           "-d", str(site)], cwd=config_dir, env=env, capture_output=True, text=True, timeout=600)


def output(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    proc = build(ROOT, site)
    assert proc.returncode == 0, output(proc)
    return site


def nav_pages() -> list[str]:
    def walk(items) -> list[str]:
        pages = []
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            pages += walk(value) if isinstance(value, list) else [value]
        return pages

    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    return walk(config["nav"])


def text_of(page: Path) -> str:
    """A built page's text: tags dropped, entities decoded, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", page.read_text())).split())


def test_every_page_and_figure_is_built(site):
    for page in nav_pages():
        built = site / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        assert built.is_file(), page
    home = text_of(site / "index.html")
    assert "bash scripts/demo.sh" in home and "bash scripts/test.sh" in home  # the home page is the README
    figures = ("assets/demo.png", "repo/benchmarks/results/memory_task.png", "repo/benchmarks/results/pretrain.png")
    for figure in figures:
        assert (site / figure).is_file(), figure


def test_configuration_reference_is_generated_from_the_code(site, capsys):
    from peft import PeftConfig

    from moraft import MoraConfig
    from moraft.cli import main
    from moraft.train.options import TrainOptions

    page = text_of(site / "configuration" / "index.html")
    inherited = {f.name for f in dataclasses.fields(PeftConfig)}
    for f in dataclasses.fields(MoraConfig):
        if f.name not in inherited:
            assert " ".join(f.metadata["help"].split()) in page, f.name
    for group in dataclasses.fields(TrainOptions):
        for option in dataclasses.fields(group.default_factory):
            assert f"--{group.name}.{option.name}" in page
    # the YAML of every default is what `moraft train --print_config` prints
    with pytest.raises(SystemExit):
        main(["train", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == TrainOptions().to_dict()
    blocks = re.findall(r"<pre>(.*?)</pre>", (site / "configuration" / "index.html").read_text(), re.DOTALL)
    shown = [yaml.safe_load(html.unescape(re.sub(r"<[^>]+>", "", b))) for b in blocks if "model" in b]
    assert printed in shown


def copy_docs(tmp_path: Path) -> Path:
    """The files the docs build reads, in a scratch copy of the repository."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "site", "runs", "__pycache__",
                                                              "*.egg-info", ".pytest_cache"))
    return copy


@pytest.mark.parametrize("damage", ["broken link", "missing anchor", "page not in nav"])
def test_strict_build_fails_on(damage, tmp_path):
    copy = copy_docs(tmp_path)
    page = copy / "docs" / "peft.md"
    if damage == "broken link":
        page.write_text(page.read_text() + "\nSee [nowhere](nowhere.md).\n")
        expected = "nowhere.md"
    elif damage == "missing anchor":
        page.write_text(page.read_text() + "\nSee [training](training.md#no-such-section).\n")
        expected = "no-such-section"
    else:
        (copy / "docs" / "orphan.md").write_text("# Orphan\n")
        expected = "orphan.md"
    proc = build(copy, tmp_path / "site")
    assert proc.returncode != 0 and expected in proc.stderr, output(proc)


# -- the README ------------------------------------------------------------------------------------------------------


def github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for command in ("bash scripts/demo.sh", "bash scripts/test.sh", ".venv/bin/mkdocs serve"):
        assert command in text
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.*)$", text, re.MULTILINE)}
    code_free = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    targets = re.findall(r"\]\(([^)\s]+)\)", code_free)
    assert targets
    for target in targets:
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        if path:
            assert (ROOT / path).is_file(), f"README links to {target}, which does not exist"
        elif anchor:
            assert anchor in anchors, f"README links to #{anchor}, which no heading makes"
    pages = set(nav_pages())
    for path in re.findall(r"\]\(docs/([^)#\s]+\.md)", code_free):
        assert path in pages, f"README links to docs/{path}, which is not in mkdocs.yml's nav"
