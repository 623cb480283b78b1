"""The server image's recipe (simulator.docker_images): the mirror comes from apt's own
configuration, and the tag changes with every input that shapes the image."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator.docker_images import (
    IMAGE_REPOSITORY,
    ImageRecipe,
    apt_sources_of_this_machine,
    image_cache_dir,
    image_name,
    mirror_of_this_machine,
)

pytestmark = pytest.mark.unit

DEB822 = """Types: deb
# a comment
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm

Types: deb
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main
"""


def _apt(tmp_path: Path, sources: str | None = None, one_line: str | None = None) -> Path:
    (tmp_path / "sources.list.d").mkdir()
    if sources is not None:
        (tmp_path / "sources.list.d" / "debian.sources").write_text(sources)
    if one_line is not None:
        (tmp_path / "sources.list").write_text(one_line)
    return tmp_path


def test_mirror_from_deb822_skips_security_sources_and_updates(tmp_path: Path) -> None:
    assert mirror_of_this_machine(_apt(tmp_path, DEB822)) == (
        "http://mirror.example/debian", "bookworm")


def test_mirror_from_a_one_line_sources_list(tmp_path: Path) -> None:
    apt = _apt(tmp_path, one_line=(
        "# old style\ndeb-src http://x.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://y.example/debian bookworm main\n"))
    assert mirror_of_this_machine(apt) == ("http://y.example/debian", "bookworm")


def test_no_mirror_is_an_error_naming_the_files(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"sources.list"):
        mirror_of_this_machine(_apt(tmp_path, "Types: deb-src\nURIs: http://x\nSuites: a\n"))


def test_sources_are_copied_verbatim(tmp_path: Path) -> None:
    apt = _apt(tmp_path, DEB822, one_line="deb http://y.example/debian bookworm main\n")
    assert apt_sources_of_this_machine(apt) == (
        ("sources.list", "deb http://y.example/debian bookworm main\n"),
        ("sources.list.d/debian.sources", DEB822))


def test_every_input_changes_the_tag() -> None:
    base = ImageRecipe(mirror="http://m/debian", suite="bookworm",
                       accounts=(("postgres", 101, 104), ("mysql", 107, 110)),
                       sources=(("sources.list", "deb http://m/debian bookworm main\n"),))
    variants = [
        base,
        ImageRecipe("http://n/debian", base.suite, base.accounts, base.sources),
        ImageRecipe(base.mirror, "trixie", base.accounts, base.sources),
        ImageRecipe(base.mirror, base.suite, (("postgres", 102, 104), ("mysql", 107, 110)),
                    base.sources),
        ImageRecipe(base.mirror, base.suite, base.accounts, ()),
        ImageRecipe(base.mirror, base.suite, base.accounts, base.sources, ("postgresql-15",)),
    ]
    assert len({recipe.digest() for recipe in variants}) == len(variants)
    assert image_name(base) == f"{IMAGE_REPOSITORY}:{base.digest()}"
    assert base.digest() == ImageRecipe(**vars(base)).digest()  # stable


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("RESILIENT_DB_IMAGE_CACHE", str(tmp_path))
    assert image_cache_dir() == tmp_path
    monkeypatch.delenv("RESILIENT_DB_IMAGE_CACHE")
    assert image_cache_dir() == Path.home() / ".cache" / "resilient_db" / "images"
