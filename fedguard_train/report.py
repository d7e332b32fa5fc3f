"""A run's human-readable report: ``report.md`` with a loss / ROUGE-L plot (``curves.png``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

_METRICS = (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"), ("bleu4", "BLEU-4"),
            ("perplexity", "perplexity"))


def plot_curves(history: Sequence[dict[str, Any]], baseline: dict[str, Any], path: Path) -> Path:
    """Training loss and ROUGE-L per round (round 0: the base model before federated training)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_rouge) = plt.subplots(1, 2, figsize=(9, 3.4))
    rounds = [r["round"] for r in history]
    ax_loss.plot(rounds, [r["train_loss"] for r in history], marker="o")
    ax_loss.set(title="mean local training loss", xlabel="round", ylabel="loss")
    scored = [baseline] + [r for r in history if "rougeL" in r]
    ax_rouge.plot([r["round"] for r in scored], [r["rougeL"] for r in scored], marker="o", color="tab:green")
    ax_rouge.set(title="ROUGE-L on the held-out split", xlabel="round (0 = base model)", ylabel="ROUGE-L")
    for ax in (ax_loss, ax_rouge):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(run_dir: Path, *, config: dict[str, Any], history: Sequence[dict[str, Any]],
                 baseline: dict[str, Any], partition: Sequence[dict[str, Any]], counts: dict[str, Any],
                 title: str = "FedHomoLLM", aggregator: str | None = None) -> Path:
    """Write ``report.md`` (and ``curves.png``) into ``run_dir``; ``aggregator``: the aggregator's label
    (e.g. one that says its MPC parties are simulated)."""
    plot_curves(history, baseline, run_dir / "curves.png")
    fed = config["federation"]
    lines = [
        f"# {title} run: {run_dir.name}",
        "",
        f"- model: `{config['model']['name_or_path']}`, adapter: **{config['adapter']['method']}**, "
        f"mode: {config['mode']}, aggregator: `{aggregator or fed['aggregator']}`",
        f"- {fed['clients']} clients, {fed['rounds']} rounds, {config['training']['local_steps']} local steps "
        f"of {config['training']['batch_size']}x{config['training']['grad_accum']} examples, "
        f"DeepSpeed ZeRO-{config['training']['zero_stage']}",
        f"- trainable (travelling) parameters: {counts['trainable']:,} of {counts['total']:,} "
        f"({100 * counts['share']:.3f}%)",
        "",
        "## Data partition (non-IID)",
        "",
        "| client | examples | attributes | most common |",
        "|---:|---:|---:|---|",
        *[f"| {p['client']} | {p['examples']} | {p['attributes']} | {p['top']} |" for p in partition],
        "",
        "## Rounds",
        "",
        "| round | train loss | " + " | ".join(t for _, t in _METRICS) + " | KiB up | KiB down | seconds |",
        "|---:|---:|" + "---:|" * len(_METRICS) + "---:|---:|---:|",
        _row(baseline),
        *[_row(r) for r in history],
        "",
        "![loss and ROUGE-L per round](curves.png)",
        "",
        *_companion_tables([baseline, *history]),
        "## Sample generations",
        "",
    ]
    final = next((r for r in reversed(history) if "samples" in r), None)
    for i, before in enumerate(baseline.get("samples", [])):
        after = final["samples"][i]["generated"] if final else "-"
        lines += [f"- **{before['prompt']}**", f"  - reference: {before['reference']}",
                  f"  - base model: {before['generated']}", f"  - after federated training: {after}"]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def companion_prefixes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Prefixes ``p`` of other models a trainer scores beside the global one (keys ``p_rougeL`` etc.; e.g.
    FedOST's ``emulator_`` and ``zeroshot_``), in order of first appearance."""
    found: list[str] = []
    for r in rows:
        for key in r:
            if key.endswith("_rougeL") and key != "rougeL" and (prefix := key[: -len("_rougeL")]) not in found:
                found.append(prefix)
    return found


def _companion_tables(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One table per companion model (see :func:`companion_prefixes`), rounds where it was scored only."""
    lines: list[str] = []
    for prefix in companion_prefixes(rows):
        scored = [r for r in rows if f"{prefix}_rougeL" in r]
        lines += [f"## Also scored: `{prefix}`", "",
                  "| round | " + " | ".join(t for _, t in _METRICS) + " |",
                  "|---:|" + "---:|" * len(_METRICS)]
        for r in scored:
            cells = [str(r.get("round", "-"))]
            cells += [f"{r[f'{prefix}_{k}']:.2f}" if f"{prefix}_{k}" in r else "-" for k, _ in _METRICS]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _row(r: dict[str, Any]) -> str:
    def num(key: str, fmt: str) -> str:
        return fmt.format(r[key]) if key in r else "-"

    cells = [str(r.get("round", "-")), num("train_loss", "{:.4f}")]
    cells += [num(k, "{:.2f}") for k, _ in _METRICS]
    cells += [num("bytes_up", "{}") if "bytes_up" not in r else f"{r['bytes_up'] / 1024:.1f}",
              "-" if "bytes_down" not in r else f"{r['bytes_down'] / 1024:.1f}", num("seconds", "{:.1f}")]
    return "| " + " | ".join(cells) + " |"
