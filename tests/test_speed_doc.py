"""No figure of the docs is typed by hand where a committed JSON holds it: re-rendering the
marked blocks from the JSONs leaves the pages as they are.

* ``python -m benchmarks.report --update docs/results.md docs/figures.md docs/performance.md``
  (the ``<!-- render: ... -->`` blocks);
* ``python -m benchmarks.speed --update-doc docs/performance.md`` (the ``<!-- speed-doc: ... -->``
  blocks: the goals table before -> after and the tables under it, from the committed
  ``benchmarks.speed`` runs);
* ``python -m benchmarks.headroom_examples --update-doc docs/headroom.md`` (the
  ``<!-- headroom-examples: ... -->`` blocks: the examples and timing, from
  ``docs/results/headroom_examples.json``).

Each check renders into a copy, so a failing run leaves the working tree untouched; the fix is
to run the command above and commit the result (or the JSON it reads).
"""

from __future__ import annotations

import os
import shutil

import pytest

from benchmarks import headroom_examples, report, speed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RENDERED = ["docs/results.md", "docs/figures.md", "docs/performance.md"]


@pytest.mark.parametrize("doc", RENDERED)
def test_report_update_leaves_the_page_unchanged(doc: str, tmp_path) -> None:
    copy = tmp_path / os.path.basename(doc)
    shutil.copy(os.path.join(ROOT, doc), copy)
    report.update_markdown(str(copy))
    assert copy.read_text() == open(os.path.join(ROOT, doc)).read(), (
        f"{doc} differs from its JSONs: run python -m benchmarks.report --update {doc}"
    )


def test_speed_doc_blocks_match_their_jsons(tmp_path) -> None:
    doc = os.path.join(ROOT, "docs/performance.md")
    text = open(doc).read()
    assert speed.DOC_START in text  # the goals table is rendered, not typed
    copy = tmp_path / "performance.md"
    copy.write_text(text)
    assert speed.update_doc(str(copy)) >= 1
    assert copy.read_text() == text, (
        "docs/performance.md differs from its JSONs: run "
        "python -m benchmarks.speed --update-doc docs/performance.md"
    )


def test_headroom_examples_blocks_match_their_json(tmp_path) -> None:
    doc = os.path.join(ROOT, "docs/headroom.md")
    text = open(doc).read()
    assert headroom_examples.DOC_START in text  # the examples' tables are rendered, not typed
    copy = tmp_path / "headroom.md"
    copy.write_text(text)
    assert headroom_examples.update_doc(str(copy)) >= 1
    assert copy.read_text() == text, (
        "docs/headroom.md differs from its JSON: run "
        "python -m benchmarks.headroom_examples --update-doc docs/headroom.md"
    )
