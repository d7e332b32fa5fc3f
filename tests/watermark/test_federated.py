"""K = 4 clients embed K independent watermarks into one federated model (FedAvg through the plaintext
aggregator): every watermark is detected, the task metric stays within 1% of the same run without
watermarks, and 1000 random keys make no claim against the unwatermarked model."""

from __future__ import annotations

import pytest

from fedguard.rng import SecureRNG
from fedguard.watermark import SignWatermark, make_sign_key
from fedguard.watermark.simulation import SimulationConfig, SimulationResult, run_federated, tiny_gpt2_lora

CONFIG = SimulationConfig()  # 4 clients, 4 rounds, 32 bits each into 8 norm blocks of 64 channels


# tiny models run fastest on one thread (and do not fight xdist's other worker for the 2 cores)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def runs() -> tuple[SimulationResult, SimulationResult]:
    return run_federated(CONFIG, watermark=True), run_federated(CONFIG, watermark=False)


def test_every_clients_watermark_is_detected_after_fedavg(runs) -> None:
    marked, _ = runs
    assert len({k.seed for k in marked.keys}) == CONFIG.clients  # K independent keys
    final = marked.detections[-1]
    assert [d.matched for d in final] == [CONFIG.bits] * CONFIG.clients
    assert all(d.verdict and d.p_value == pytest.approx(2.0**-CONFIG.bits) for d in final)
    # re-verify from scratch on the final global model (fresh bindings, nothing cached from training)
    assert all(SignWatermark(k, marked.model).detect().matched == CONFIG.bits for k in marked.keys)


def test_task_metric_is_within_one_percent_of_the_run_without_watermarks(runs) -> None:
    marked, clean = runs
    assert clean.eval_history[-1] < clean.eval_history[0]  # the task was learnt
    assert abs(marked.eval_loss - clean.eval_loss) / clean.eval_loss < 0.01


def test_clients_watermarks_do_not_verify_on_the_unwatermarked_run(runs) -> None:
    marked, clean = runs
    assert not any(SignWatermark(k, clean.model).detect().verdict for k in marked.keys)


def test_no_false_claim_among_1000_random_keys_against_the_unwatermarked_model(runs) -> None:
    _, clean = runs
    start = tiny_gpt2_lora(CONFIG, 0)
    start.load_state_dict(clean.initial_model_state)  # the public starting point keys are made against
    rng = SecureRNG.for_testing("watermark/false-positives")
    claims, matched = 0, []
    first = make_sign_key(start, bits=CONFIG.bits, n_clients=CONFIG.clients, rng=rng.spawn("0"))
    for i in range(1000):
        key = first if i == 0 else make_sign_key(start, like=first, rng=rng.spawn(str(i)))  # same targets
        d = SignWatermark(key, clean.model).detect(significance=1e-6)
        claims += d.verdict
        matched.append(d.matched)
    assert claims == 0
    # and the null is what the p-value assumes: Binomial(32, 1/2) has mean 16, sd 2.83
    mean = sum(matched) / len(matched)
    assert abs(mean - 16) < 4 * 2.83 / len(matched) ** 0.5
