"""The docs a newcomer reads: the generated pages equal what the code accepts and exposes,
and every relative link in the README and docs/ leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.config.reference import MEANINGS, fields
from gateway.config.reference import markdown as config_markdown
from gateway.metrics import markdown as metrics_markdown

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"


def test_every_config_field_has_a_meaning_and_no_meaning_is_stale() -> None:
    paths = [path for path, _ in fields()]
    assert len(paths) == len(set(paths))
    assert [p for p in paths if p not in MEANINGS] == []
    assert [p for p in MEANINGS if p not in paths] == []


def test_the_configuration_reference_is_generated_from_the_models() -> None:
    page = (DOCS / "configuration.md").read_text()
    assert page == config_markdown(), (
        "docs/configuration.md is stale: python -m gateway.config.reference > docs/configuration.md"
    )
    # spot checks that the generator reads defaults from the models
    assert "| `state.backend` | `sqlite` |" in page
    assert "| `server.reload_interval_seconds` | `5` |" in page
    assert "| `resources.NAME.endpoint` | required |" in page


def test_the_metrics_list_is_generated_from_the_registry() -> None:
    page = (DOCS / "metrics.md").read_text()
    assert page == metrics_markdown(), (
        "docs/metrics.md is stale: python -m gateway.metrics > docs/metrics.md"
    )
    assert (
        "| `gateway_requests_total` | counter | tenant, model, operation, status, transport |"
        in page
    )


@pytest.mark.parametrize(
    "page", [ROOT / "README.md", *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name
)
def test_relative_links_lead_somewhere(page: Path) -> None:
    text = page.read_text()
    for target in re.findall(r"\]\((?!https?:|mailto:)([^)#\s]+)(?:#[^)]*)?\)", text):
        assert (page.parent / target).exists(), f"{page.name}: {target}"


def test_the_readme_opens_with_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text().split("\n")[:6]
    assert head[2] == "```sh"
    assert head[3].startswith("bash scripts/demo.sh") and head[4].startswith("bash scripts/test.sh")
