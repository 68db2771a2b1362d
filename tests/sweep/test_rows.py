from __future__ import annotations

from sweep.document import to_html, to_markdown
from sweep.rows import pruning_summary


def _row(state, tokens, steps, max_steps=24):
    return {"state": state, "train_tokens": tokens, "steps": steps, "max_steps": max_steps}


def test_pruning_summary_counts_what_the_pruner_saved():
    rows = [_row("complete", 2400, 24), _row("pruned", 300, 3), _row("pruned", 900, 9)]
    s = pruning_summary(rows)
    assert s["tokens_spent"] == 3600
    assert s["tokens_saved_estimate"] == 21 * 100 + 15 * 100  # remaining steps x own rate
    assert (s["complete"], s["pruned"], s["fail"], s["infeasible"]) == (1, 2, 0, 0)


def test_documents_escape_cells():
    blocks = [("h1", "a <b>"), ("table", ["x|y"], [["1|2\nz"]]), ("figure", "pareto", "t")]
    md, page = to_markdown(blocks), to_html(blocks, "t")
    assert "| x\\|y |" in md and "| 1\\|2 z |" in md and "![t](pareto.png)" in md
    assert "a &lt;b&gt;" in page and "<img src='pareto.png'" in page
