"""docs/ cannot drift from the code it documents."""

from pathlib import Path

from mtrec.configdoc import reference_keys, reference_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_configuration_reference_is_generated_from_the_model():
    text = (DOCS / "configuration.md").read_text()
    assert text == reference_markdown(), "regenerate: python -m mtrec.configdoc > docs/configuration.md"


def test_every_documented_key_exists_and_every_key_is_documented():
    keys = reference_keys()
    for key in (
        "name",
        "labels",
        "features.sparse[].hash_size",
        "features.bias[].num_values",
        "tasks[].given",
        "model.shallow_tower",
        "train.embedding_optimizer.lr",
        "job.max_bad_fraction",
        "model.num_experts",
    ):
        assert key in keys
    documented = {
        line.split("`")[1] for line in (DOCS / "configuration.md").read_text().splitlines() if line.startswith("| `")
    }
    assert documented == keys


def test_docs_link_targets_exist():
    import re

    root = DOCS.parent
    for page in [root / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+\.md)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
