"""Leakage audit of a run: what a curious server (and anyone holding the model) actually learns.

``fedguard audit leakage --run DIR`` runs the suite the run's configuration calls for and writes
``leakage.json``, ``leakage.md`` and PNGs (:func:`audits.report.write_report`):

* **membership inference** (:mod:`attacks.membership`) against the run's final global model — members
  are the clients' training examples, non-members the held-out split (same distribution: AUC 0.5 is
  chance); half of the held-out split is set aside as RMIA's population, the base model (the initial
  adapter) is the reference, LiRA runs with ``--shadows`` shadow fine-tunes of the run's adapter;
* **update inversion** (:mod:`attacks.inversion`, DAGER-style; or with ``--method lamp``
  :mod:`attacks.optimisation`, LAMP/TAG gradient matching) on every client's captured input of each captured round
  (``capture: true``; :mod:`fedguard_train.capture`), and on the revealed aggregate, scored against the
  examples each client really trained on that round (replayed from the trainer's seeded batch order);
  with masking the per-client inputs are masked vectors, with Paillier ciphertexts (not decodable).

``fedguard attack inversion|membership --run DIR`` run one attack each, with the same report format.
Recovered text is redacted to its first words in the Markdown (the JSON holds token counts and scores
only); the run's own DP accounting (if any) is quoted, not re-derived.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedguard.errors import ConfigError, FedGuardError

REDACT_WORDS = 3
LAMP_MATCH = 0.1
"""A LAMP recovery whose gradient distance ``D`` (attacks.optimisation) is below this matched the update."""


def redact(text: str, words: int = REDACT_WORDS) -> str:
    """The first ``words`` words of ``text`` and an ellipsis (recoveries are training data)."""
    parts = text.split()
    return " ".join(parts[:words]) + (" …" if len(parts) > words else "")


@dataclass
class InversionRecord:
    """The inversion of one captured input (or aggregate) of one round."""

    round_id: int
    target: str  # "client k" or "aggregate"
    aggregator: str
    score: dict[str, float] = field(default_factory=dict)
    informative: bool = False
    reason: str = ""
    rank: tuple[int, int] = (0, 0)
    n_true: int = 0
    n_recovered: int = 0
    examples: list[tuple[str, str]] = field(default_factory=list)  # (truth, recovery), decoded
    method: str = "dager"
    distance: float | None = None  # LAMP: the recovered batch's gradient distance to the observed update

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round_id, "target": self.target, "aggregator": self.aggregator,
                "method": self.method, "gradient_distance": self.distance, **self.score,
                "informative": self.informative, "reason": self.reason, "rank": list(self.rank),
                "n_true_sequences": self.n_true, "n_recovered_sequences": self.n_recovered}


METHODS = ("dager", "lamp")
"""The update-inversion attacks: DAGER-style span checks (:mod:`attacks.inversion`) and LAMP/TAG-style
gradient matching (:mod:`attacks.optimisation`)."""


def invert_run(run: Any, *, rounds: Sequence[int] | None = None, config: Any = None, seed: int = 0,
               progress: bool = False, method: str = "dager", lamp_config: Any = None) -> list[InversionRecord]:
    """``method`` (DAGER or LAMP) on each client's captured input and on the aggregate of the captured
    ``rounds`` (default: all). LAMP matches the direction of each captured update (``target="update"``)
    over every travelling parameter, for a batch of the lengths the client really trained on."""
    import dataclasses

    from attacks import run_view
    from attacks.inversion import InversionConfig, dager, score_recovery, target_parameters
    from attacks.optimisation import LampConfig, lamp

    if method not in METHODS:
        raise ConfigError(f"unknown inversion method {method!r} (known: {', '.join(METHODS)})")

    available = run_view.captured_rounds(run)
    if not available:
        raise ConfigError(f"{run.path} has no captured server view: train with `capture: true` (it is off by "
                          f"default) to audit what the server receives")
    chosen = list(rounds) if rounds else available
    missing = sorted(set(chosen) - set(available))
    if missing:
        raise ConfigError(f"rounds {missing} were not captured (captured: {available})")
    names = target_parameters(run.model)[:2]
    absent = [n for n in names if n not in run.layout.names]
    if absent:
        raise ConfigError(f"the first blocks' projections do not travel in this run ({absent} not in the layout): "
                          f"the inversion attack reads their update")
    cfg = config or InversionConfig()
    eos = run.tokenizer.eos_token_id
    longest = max(len(it["input_ids"]) for items in run.client_items for it in items)
    cfg = dataclasses.replace(cfg, eos_id=eos, max_len=longest, seed=seed)
    lcfg = dataclasses.replace(lamp_config or LampConfig(), eos_id=eos, seed=seed)
    vocab_size = int(run.model.config.vocab_size)
    out: list[InversionRecord] = []

    def decode_ids(ids: Sequence[int]) -> str:
        return str(run.tokenizer.decode(list(ids), skip_special_tokens=True))

    for round_id in chosen:
        doc = run_view.manifest(run, round_id)
        start = run_view.round_start(run, round_id)
        run.load(start)
        truths: dict[int, list[list[int]]] = {}
        for client in doc["participants"]:
            seen = run_view.examples_seen(run, round_id, client)
            truths[client] = [list(run.client_items[client][i]["input_ids"]) for i in seen]
        targets: list[tuple[str, np.ndarray | None, float, list[list[int]], str]] = []
        for client in doc["participants"]:
            try:
                vector, noise = run_view.client_update(run, round_id, client)
                targets.append((f"client {client}", vector, noise, truths[client], ""))
            except FedGuardError as err:
                targets.append((f"client {client}", None, 0.0, truths[client], str(err)))
        mean, contributors = run_view.aggregate_mean(run, round_id)
        union = [s for c in contributors for s in truths.get(c, [])]
        spec_noise = 1.0 / run_view.view_spec(doc).scale if doc.get("fixed_point") else 0.0
        targets.append(("aggregate", mean, spec_noise / max(len(contributors), 1), union, ""))
        for label, maybe_vector, noise, truth, error in targets:
            record = InversionRecord(round_id, label, doc["aggregator"], n_true=len(truth), method=method)
            if maybe_vector is None:
                record.reason = error
                out.append(record)
                continue
            named = run_view.named_update(run, maybe_vector)
            if method == "lamp":
                try:
                    found = lamp(run.model, named, [len(s) for s in truth], config=lcfg, target="update",
                                 progress=progress)
                except ConfigError as err:
                    record.reason = str(err)
                    out.append(record)
                    continue
                score = score_recovery(truth, found.sequences, vocab_size=vocab_size, decode=decode_ids, seed=seed)
                record.score, record.distance = score.to_json(), found.final_distance
                record.informative = found.final_distance < LAMP_MATCH
                record.reason = f"gradient distance {found.final_distance:.3f}"
                record.n_recovered = len(found.sequences)
                record.examples = [(decode_ids(t), decode_ids(r)) for t, r in score.pairs[:3]]
                out.append(record)
                continue
            outcome = dager(run.model, {n: named[n] for n in names}, config=cfg, noise_std=noise,
                            lengths_hint=[len(s) for s in truth], progress=progress)
            score = score_recovery(truth, outcome.sequences, vocab_size=vocab_size, decode=decode_ids, seed=seed)
            record.score = score.to_json()
            record.informative, record.reason, record.rank = outcome.informative, outcome.reason, outcome.rank
            record.n_recovered = len(outcome.sequences)
            record.examples = [(decode_ids(t), decode_ids(r)) for t, r in score.pairs[:3]]
            out.append(record)
    return out


def _weights_key(name: str, vector: np.ndarray) -> str:
    import hashlib

    return f"{name}:{hashlib.sha256(np.ascontiguousarray(vector).tobytes()).hexdigest()}"


def _member_examples(run: Any, keys: Sequence[tuple[int, int]]) -> tuple[list[Any], list[bytes]]:
    """The items and raw texts (``run.texts["members"]``, all clients' in client order) of the clients'
    examples ``keys``, ``(client, index)`` pairs."""
    offsets = np.cumsum([0, *[len(items) for items in run.client_items]])
    return ([run.client_items[c][i] for c, i in keys],
            [run.texts["members"][int(offsets[c]) + i] for c, i in keys])


MEMBER_SETS = ("seen", "partition")
"""Who counts as a member: ``seen`` — the examples some client trained on (replayed from the trainer's seeded
batch order; :func:`attacks.run_view.trained_on`); ``partition`` — every example of the clients' data, most of
which a short run never draws (they dilute the attack towards chance)."""


def membership_on_run(run: Any, *, target: np.ndarray | None = None, members: Sequence[Any] | None = None,
                      member_texts: Sequence[bytes] | None = None, target_name: str = "global model",
                      shadows: int = 0, n_boot: int = 1000, seed: int = 0, max_members: int = 200,
                      member_set: str = "seen", population: int | None = None, lira_nonmembers: int = 0,
                      stats_cache: Any = None, progress: bool = False) -> Any:
    """The membership suite against ``target`` (default: the final global vector) loaded into the run's model.

    Members: ``members`` if given (with ``member_texts`` for zlib), else the clients' examples of
    ``member_set`` (:data:`MEMBER_SETS`), a seeded sample of ``max_members`` if there are more. Non-members
    and RMIA's population split the held-out examples (the run's test split plus any ``extra_heldout`` drawn
    by :func:`attacks.run_view.load_run`, same distribution): ``population`` of them (default: half) for RMIA,
    the rest scored as non-members. LiRA's shadows (``shadows``) are fine-tunes of the run's initial adapter
    with the run's batch size and learning rate, one pass over their half of the scored examples (each IN
    example trained on once, as a member was), on every scored example or, with ``lira_nonmembers``, on the
    members and that many non-members. ``stats_cache``: a dict shared by audits of runs from the same base
    model and data, so that the reference model scores each item list once (:func:`attacks.membership.run_membership`)."""
    import copy
    import dataclasses

    from attacks import run_view
    from attacks.membership import MembershipConfig, ShadowRecipe, run_membership

    if member_set not in MEMBER_SETS:
        raise ConfigError(f"unknown member set {member_set!r} (known: {', '.join(MEMBER_SETS)})")
    cfg = run.config
    rng = np.random.default_rng(seed)
    if members is not None:
        pool = list(members)
        texts_pool = list(member_texts) if member_texts is not None else None
    else:
        if member_set == "seen":
            keys = run_view.trained_on(run)
        else:
            keys = [(c, i) for c, items in enumerate(run.client_items) for i in range(len(items))]
        pool, texts_pool = _member_examples(run, keys)
    if len(pool) > max_members:
        pick = sorted(rng.choice(len(pool), size=max_members, replace=False).tolist())
        pool = [pool[i] for i in pick]
        texts_pool = [texts_pool[i] for i in pick] if texts_pool is not None else None
    held = list(range(len(run.test_items)))
    rng.shuffle(held)
    cut = len(held) // 2 if population is None else population
    if not 0 <= cut <= len(held) - 2:
        raise ConfigError(f"population {cut} leaves fewer than 2 of the {len(held)} held-out examples as "
                          f"non-members: draw more with --extra-nonmembers")
    nonmembers = [run.test_items[i] for i in held[cut:]]
    population_items = [run.test_items[i] for i in held[:cut]]
    texts = None
    if texts_pool is not None:
        texts = {"members": texts_pool, "nonmembers": [run.texts["nonmembers"][i] for i in held[cut:]]}
    reference = copy.deepcopy(run.model)
    from fedguard.params import load_vector

    load_vector(reference, run.layout, run.initial)
    run.load(run.final if target is None else target)
    recipe = ShadowRecipe(epochs=1, batch_size=cfg.training.batch_size, lr=cfg.training.lr)
    mcfg = MembershipConfig(shadows=shadows, recipe=recipe, n_boot=n_boot, seed=seed, lira_nonmembers=lira_nonmembers)
    pad = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
    report = run_membership(run.model, pool, nonmembers, reference=reference, population=population_items,
                            texts=texts, config=mcfg, pad_id=pad, target_name=target_name, progress=progress,
                            stats_cache=stats_cache, reference_key=_weights_key(cfg.model.name_or_path, run.initial))
    what = ("given" if members is not None else
            "examples a client trained on (replayed batch order)" if member_set == "seen" else
            "the clients' whole partitions, trained on or not")
    return dataclasses.replace(report, notes=(f"members: {what}", *report.notes))


# -- the report -----------------------------------------------------------------------------------------------

def _roc_plot(reports: Sequence[Any]) -> Any:
    def draw(fig: Any) -> None:
        axes = fig.subplots(1, len(reports), squeeze=False)[0]
        for ax, report in zip(axes, reports):
            for r in report.results:
                ax.plot(r.roc.fpr, r.roc.tpr, label=f"{r.attack} (AUC {r.roc.auc:.2f})")
            ax.plot([0, 1], [0, 1], "k:", lw=0.8)
            ax.set_xscale("symlog", linthresh=0.01)
            ax.set_xlim(0, 1)
            ax.set_xlabel("false-positive rate")
            ax.set_ylabel("true-positive rate")
            ax.set_title(f"membership: {report.target}", fontsize=9)
            ax.legend(fontsize=7)
    return draw


def _inversion_plot(records: Sequence[InversionRecord]) -> Any:
    def draw(fig: Any) -> None:
        ax = fig.subplots()
        labels = [f"r{r.round_id} {r.target}" for r in records]
        x = np.arange(len(records))
        ax.bar(x - 0.2, [r.score.get("rouge1", 0.0) for r in records], 0.4, label="ROUGE-1")
        ax.bar(x + 0.2, [100 * r.score.get("exact", 0.0) for r in records], 0.4, label="exact recovery %")
        ax.plot(x, [r.score.get("chance_rouge1", 0.0) for r in records], "k_", ms=14, label="chance ROUGE-1")
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylim(0, 105)
        ax.set_title(f"update inversion ({', '.join(sorted({r.method for r in records}))}) per captured input")
        ax.legend(fontsize=7)
    return draw


def _markdown(title: str, run: Any, memberships: Sequence[Any], records: Sequence[InversionRecord],
              notes: Sequence[str]) -> str:
    cfg = run.config
    lines = [f"# {title}", "", f"Run `{run.path}`: trainer {cfg.trainer}, model {cfg.model.name_or_path}, adapter "
             f"{cfg.adapter.method} r={cfg.adapter.r}, {cfg.federation.clients} clients, aggregator "
             f"{cfg.federation.aggregator}, DP {'on' if cfg.dp is not None else 'off'}, final round {run.final_round}.",
             ""]
    if (run.path / "server_view").exists():
        lines += ["> **SERVER VIEW CAPTURED** in this run (`server_view/`): it holds what the server received, "
                  "as sensitive as the clients' training data.", ""]
    lines += [f"- {n}" for n in notes]
    for report in memberships:
        lines += ["", f"## Membership inference: {report.target}", "",
                  f"{report.n_members} members, {report.n_nonmembers} non-members "
                  f"(held-out split, same distribution), {report.n_population} population examples (RMIA), "
                  f"{report.shadows} shadow models. With {report.n_nonmembers} non-members the smallest non-zero "
                  f"FPR is {1 / max(report.n_nonmembers, 1):.3f}: TPR at lower FPRs is the TPR at zero false "
                  "positives.", "",
                  "| attack | n (members / non-members) | AUC | 95% CI | TPR@1%FPR | 95% CI | TPR@0.1%FPR | 95% CI | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in report.results:
            ci = r.roc.auc_ci
            t1, t01 = (r.roc.tpr_ci.get(a, (float("nan"),) * 2) for a in (0.01, 0.001))
            lines.append(f"| {r.attack} | {r.roc.n_members} / {r.roc.n_nonmembers} | {r.roc.auc:.3f} | "
                         f"[{ci[0]:.3f}, {ci[1]:.3f}] | "
                         f"{100 * r.roc.tpr_at.get(0.01, float('nan')):.1f}% | [{100 * t1[0]:.1f}, {100 * t1[1]:.1f}] | "
                         f"{100 * r.roc.tpr_at.get(0.001, float('nan')):.1f}% | [{100 * t01[0]:.1f}, {100 * t01[1]:.1f}] | "
                         f"{r.note} |")
        lines += [f"- {n}" for n in report.notes]
    if records:
        kinds = sorted({r.method for r in records})
        what = {"dager": "DAGER-style, first two blocks' input projections",
                "lamp": "LAMP/TAG-style gradient matching with the base model as prior"}
        lines += ["", f"## Update inversion ({'; '.join(what[k] for k in kinds)})", "",
                  "| round | target | aggregator | exact | token acc. | ROUGE-1 | ROUGE-2 | chance ROUGE-1 | rank / distance | "
                  "informative / why not |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in records:
            s = r.score
            if not s:
                lines.append(f"| {r.round_id} | {r.target} | {r.aggregator} | – | – | – | – | – | – | {r.reason} |")
                continue
            rank = f"{r.rank[0]}/{r.rank[1]}" if r.method == "dager" else f"D = {r.distance:.3f}"
            lines.append(f"| {r.round_id} | {r.target} | {r.aggregator} | {100 * s['exact']:.1f}% | "
                         f"{100 * s['token_accuracy']:.1f}% | {s['rouge1']:.1f} | {s['rouge2']:.1f} | "
                         f"{s['chance_rouge1']:.1f} | {rank} | "
                         f"{'yes' if r.informative else 'no: ' + r.reason} |")
        shown = [r for r in records if r.examples]
        if shown:
            lines += ["", f"Examples (redacted to the first {REDACT_WORDS} words):", "",
                      "| round | target | truth | best recovery |", "|---|---|---|---|"]
            for r in shown:
                for truth, rec in r.examples[:2]:
                    lines.append(f"| {r.round_id} | {r.target} | {redact(truth)} | {redact(rec) or '(none)'} |")
    return "\n".join(lines) + "\n"


def write_leakage_report(out: str | Path, stem: str, title: str, run: Any, memberships: Sequence[Any],
                         records: Sequence[InversionRecord], notes: Sequence[str] = ()) -> Any:
    from audits.report import write_report

    data: dict[str, Any] = {
        "run": str(run.path), "final_round": run.final_round, "aggregator": run.config.federation.aggregator,
        "dp": run.config.dp is not None, "server_view_captured": (run.path / "server_view").exists(),
        "notes": list(notes), "membership": [m.to_json() for m in memberships],
        "inversion": [r.to_json() for r in records]}
    plots: dict[str, Any] = {}
    if memberships:
        plots[f"{stem}_roc.png"] = _roc_plot(memberships)
    if records:
        plots[f"{stem}_inversion.png"] = _inversion_plot(records)
    return write_report(out, stem, data, _markdown(title, run, memberships, records, notes), plots)


# -- commands -----------------------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--run", required=True, help="the run directory (config.json, checkpoints/, server_view/)")
    p.add_argument("--out", default=None, help=f"report directory (default: <run>/{out})")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (bootstrap, splits, guesses)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register_attacks(commands: Any) -> None:
    """``fedguard attack inversion`` and ``fedguard attack membership`` (entry point ``attack-leakage``)."""
    p = commands.subcommand("attack", "inversion", help="recover clients' training text from the captured server "
                            "view (DAGER-style; report: JSON, MD, PNG)", group_help="attacks against fedguard's protections")
    _common(p, "attacks")
    p.add_argument("--round", type=int, action="append", default=None, help="captured round(s) (default: all)")
    p.add_argument("--tau", type=float, default=None, help="span-distance cut-off (default 0.01)")
    _method_options(p)
    p.set_defaults(handler=_run_inversion)
    p = commands.subcommand("attack", "membership", help="membership inference against a run's global model or one "
                            "client's captured update (report: JSON, MD, PNG)")
    _common(p, "attacks")
    p.add_argument("--client", type=int, default=None, help="attack θ_r + this client's captured update instead")
    p.add_argument("--round", type=int, default=None, help="with --client: the captured round (default: the last)")
    _membership_options(p)
    p.set_defaults(handler=_run_membership)


def _membership_options(p: Any) -> None:
    """The membership-inference options shared by ``attack membership`` and ``audit leakage``."""
    p.add_argument("--shadows", type=int, default=0, help="LiRA shadow fine-tunes (even; 0: no LiRA)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap draws for the intervals")
    p.add_argument("--max-members", type=int, default=200, help="members scored (a seeded sample)")
    p.add_argument("--extra-nonmembers", type=int, default=0,
                   help="WordNet runs: more held-out examples the run never loaded (same seeded draw)")
    p.add_argument("--members", choices=MEMBER_SETS, default="seen",
                   help="seen: the examples a client trained on (default); partition: all of the clients' data")
    p.add_argument("--population", type=int, default=None,
                   help="held-out examples set aside as RMIA's population (default: half; the rest are non-members)")
    p.add_argument("--lira-nonmembers", type=int, default=0,
                   help="LiRA on all members and this many non-members only (0: all; bounds the shadows' cost)")


def _method_options(p: Any) -> None:
    """The update-inversion method and LAMP's budget (shared by ``attack inversion`` and ``audit leakage``)."""
    p.add_argument("--method", choices=METHODS, default="dager",
                   help="dager: exact span checks (fast); lamp: LAMP/TAG gradient matching (slow: tiny models)")
    p.add_argument("--lamp-steps", type=int, default=300, help="LAMP: continuous steps per restart")
    p.add_argument("--lamp-restarts", type=int, default=1, help="LAMP: random restarts")


def _lamp_config(args: argparse.Namespace) -> Any:
    from attacks.optimisation import LampConfig

    return LampConfig(steps=args.lamp_steps, restarts=args.lamp_restarts, discrete_every=min(50, args.lamp_steps))


def register_audit(commands: Any) -> None:
    """``fedguard audit leakage`` (entry point ``audit-leakage``)."""
    p = commands.subcommand("audit", "leakage", help="what a curious server and a model holder learn from a run: "
                            "membership inference and update inversion (report: JSON, MD, PNG)")
    _common(p, "leakage")
    _membership_options(p)
    _method_options(p)
    p.set_defaults(handler=_run_audit)


def _out(args: argparse.Namespace, default: str) -> Path:
    return Path(args.out) if args.out else Path(args.run) / default


def _run_inversion(args: argparse.Namespace) -> int:
    from attacks.inversion import InversionConfig
    from attacks.run_view import load_run

    run = load_run(args.run)
    cfg = InversionConfig(tau=args.tau) if args.tau is not None else None
    records = invert_run(run, rounds=args.round, config=cfg, seed=args.seed, progress=not args.quiet,
                         method=args.method, lamp_config=_lamp_config(args))
    paths = write_leakage_report(_out(args, "attacks"), "inversion", "Update inversion", run, [], records)
    for r in records:
        s = r.score
        print(f"{r.method} round {r.round_id} {r.target:10s} exact {100 * s.get('exact', 0):5.1f}% ROUGE-1 "
              f"{s.get('rouge1', 0):5.1f} (chance {s.get('chance_rouge1', 0):4.1f}) "
              f"{'' if r.informative else '[uninformative: ' + r.reason + ']'}")
    print(f"report: {paths.markdown}")
    return 0


def _run_membership(args: argparse.Namespace) -> int:
    from attacks import run_view
    from attacks.run_view import load_run

    run = load_run(args.run, extra_heldout=args.extra_nonmembers)
    target, members, texts, name = None, None, None, "global model"
    if args.client is not None:
        rounds = run_view.captured_rounds(run)
        if not rounds:
            raise ConfigError("--client needs a captured server view (capture: true)")
        round_id = args.round if args.round is not None else rounds[-1]
        if not 0 <= args.client < len(run.client_items):
            raise ConfigError(f"--client must be in [0, {len(run.client_items) - 1}], got {args.client}")
        vector, _ = run_view.client_update(run, round_id, args.client)
        target = run_view.round_start(run, round_id) + vector
        index = (run_view.examples_seen(run, round_id, args.client) if args.members == "seen"
                 else range(len(run.client_items[args.client])))
        members, texts = _member_examples(run, [(args.client, i) for i in index])
        name = f"θ_{round_id} + client {args.client}'s captured update"
    report = membership_on_run(run, target=target, members=members, member_texts=texts, target_name=name,
                               shadows=args.shadows, n_boot=args.n_boot, seed=args.seed, max_members=args.max_members,
                               member_set=args.members, population=args.population,
                               lira_nonmembers=args.lira_nonmembers, progress=not args.quiet)
    paths = write_leakage_report(_out(args, "attacks"), "membership", "Membership inference", run, [report], [])
    for r in report.results:
        print(f"{r.attack:9s} AUC {r.roc.auc:.3f} [{r.roc.auc_ci[0]:.3f}, {r.roc.auc_ci[1]:.3f}] "
              f"TPR@1%FPR {100 * r.roc.tpr_at[0.01]:.1f}%")
    print(f"report: {paths.markdown}")
    return 0


def _run_audit(args: argparse.Namespace) -> int:
    from attacks import run_view
    from attacks.run_view import load_run

    run = load_run(args.run, extra_heldout=args.extra_nonmembers)
    notes: list[str] = []
    memberships = [membership_on_run(run, shadows=args.shadows, n_boot=args.n_boot, seed=args.seed,
                                     max_members=args.max_members, member_set=args.members,
                                     population=args.population, lira_nonmembers=args.lira_nonmembers,
                                     progress=not args.quiet)]
    records: list[InversionRecord] = []
    if run_view.captured_rounds(run):
        try:
            records = invert_run(run, seed=args.seed, progress=not args.quiet, method=args.method,
                                 lamp_config=_lamp_config(args))
        except ConfigError as err:
            notes.append(f"update inversion not run: {err}")
    else:
        notes.append("update inversion not run: the server view was not captured (train with `capture: true`)")
    if run.config.dp is not None:
        notes.append("the run used DP: its privacy ledger states ε; the attacks above measure what it buys")
    paths = write_leakage_report(_out(args, "leakage"), "leakage", "Leakage audit", run, memberships, records, notes)
    for n in notes:
        print(n)
    print(f"report: {paths.markdown}")
    return 0
