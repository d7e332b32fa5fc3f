"""Paper Table 3 (`python -m fedguard_train.comm_cost`): trainable share and message sizes at 6B-7B shapes."""

from __future__ import annotations

import pytest

from fedguard_train.comm_cost import communication_table, format_table


def test_table_3_matches_the_paper_for_chatglm_and_shows_no_paper_figure_for_llama() -> None:
    rows = {(r["model"], r["method"]): r for r in communication_table()}
    glm_lora = rows[("ChatGLM-6B shapes", "lora")]
    assert glm_lora["trainable"] == 3_670_016 and glm_lora["paper_share_percent"] == 0.058
    assert glm_lora["share_percent"] == pytest.approx(0.0595, abs=5e-4)
    assert rows[("ChatGLM-6B shapes", "p-tuning-v2")]["trainable"] == 29_360_128
    for method in ("lora", "p-tuning-v2", "full"):
        assert rows[("LLaMA-7B", method)]["paper_share_percent"] is None  # the paper measured ChatGLM-6B only
    text = format_table(list(rows.values()))
    assert "| LLaMA-7B | lora | 4.19M | 0.062 | — |" in text
