"""`python -m fedguard_train.comm_cost`: Table 3 at 6B-7B shapes, and bytes per round per aggregator and encoding
measured from real rounds, matching the trainer's round table."""

from __future__ import annotations

from pathlib import Path

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


def test_table_3_counts_houlsby_adapters_at_full_scale() -> None:
    rows = {(r["model"], r["method"]): r for r in communication_table()}
    bottleneck = rows[("ChatGLM-6B shapes", "bottleneck")]
    # 2 adapters per block x 28 blocks x (2·d·m + d + m), d = 4096, m = 16; the paper has no figure for it
    assert bottleneck["trainable"] == 2 * 28 * (2 * 4096 * 16 + 4096 + 16) == 7_570_304
    assert bottleneck["paper_share_percent"] is None


TEST_OPTIONS = {"paillier": {"key_bits": 512, "allow_insecure_test_keys": True}, "mpc": {"backend": "simulated"}}


def test_bytes_per_round_come_from_real_rounds_of_every_aggregator() -> None:
    from fedguard_train.comm_cost import format_round_table, round_bytes_table

    rows = round_bytes_table(lengths=(500, 1000), project_to=1000, options=TEST_OPTIONS)
    by = {(r["aggregator"], r["encoding"]): r for r in rows}
    assert {a for a, _ in by} >= {"plaintext", "masking", "paillier", "mpc"}
    ring_bytes = {"24-bit values (trainer default)": 8, "16-bit values, ring auto": 4, "8-bit values": 4,
                  "16-bit upload": 2, "8-bit upload": 1}  # the ring sized to need, on the wire
    for (name, encoding), r in by.items():
        assert r["projected_up_bytes"] == pytest.approx(r["measured_up"][1])  # the fit reproduces the 2nd round
        assert r["ring_bits"] == 8 * ring_bytes[encoding]
        if name in ("plaintext", "masking", "mpc"):  # ring elements in the ring's width (+ a few header digits);
            # MPC: party 0's share sealed in the ring's word, the other parties' seeds a constant
            assert r["up_bytes_per_value"] == pytest.approx(ring_bytes[encoding], abs=0.01)
    fine, coarse = by[("paillier", "24-bit values (trainer default)")], by[("paillier", "8-bit values")]
    assert coarse["up_bytes_per_value"] < fine["up_bytes_per_value"]  # more 8-bit values per ciphertext
    assert by[("paillier", "8-bit upload")]["up_bytes_per_value"] < coarse["up_bytes_per_value"]  # weight 1: narrower slots
    assert "| paillier | 8-bit values | 32 |" in format_round_table(rows)


@pytest.mark.deepspeed
def test_the_trainers_round_table_shows_the_bytes_comm_cost_measures(tmp_path: Path, task: Path) -> None:
    from fedguard_train.comm_cost import round_bytes_table
    from fedguard_train.report import write_report
    from fedguard_train.trainers.homo import FedHomoLLM
    from tests.train.conftest import tiny_config

    config = tiny_config(tmp_path, task, federation={"clients": 2, "rounds": 1, "aggregator": "masking"})
    trainer = FedHomoLLM(config, quiet=True)
    result = trainer.run()
    d = trainer.layout.size
    (row,) = round_bytes_table(lengths=(500, 1000), clients=2, project_to=d, aggregators=["masking"],
                               encodings={"default": {"value_bits": config.federation.value_bits,
                                                      "max_weight": trainer.spec.max_weight}})
    # the ring sized to need: a tiny task's weights fit 24-bit values into the 32-bit ring (4 B per value)
    assert trainer.spec.ring_bits == row["ring_bits"] == 32
    assert row["up_bytes_per_value"] == pytest.approx(4.0, abs=0.01)
    assert result.history[0]["bytes_up"] == pytest.approx(2 * row["projected_up_bytes"], abs=2)
    report = write_report(Path(config.run_dir), config=config.to_dict(), history=result.history,
                          baseline=result.baseline, partition=trainer.partition, counts=trainer.counts).read_text()
    assert f"{result.history[0]['bytes_up'] / 1024:.1f}" in report
