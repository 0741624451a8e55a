"""The figures and the page of `fedsilo report`, drawn from a `RunHistory`.

Pure functions: each takes the history and returns a matplotlib Figure on the Agg canvas
(no pyplot, so no global figure state and no display needed) or None when the run has
nothing to show there; `render_page` returns the HTML text. Writing files is the
command's job (`cli/report.py`).
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedsilo.aggregator.history import RunHistory

__all__ = [
    "MTAL_DEFINITION",
    "Section",
    "bytes_figure",
    "experts_count_figure",
    "experts_figure",
    "privacy_figure",
    "render_page",
    "scores_figure",
    "sections",
    "times_figure",
]

MTAL_DEFINITION = (
    "MTA of a round is the mean over silos of the scores they reported that round, each silo "
    "scored on its own test split with its own (personalised) model. MTAL is the mean over "
    "silos of each silo's latest score: the MTA after the last round that scored them "
    "(summary.json's mtal)."
)


@dataclass(frozen=True)
class Section:
    """One figure of the report: its file name, heading and caption."""

    name: str
    title: str
    caption: str
    figure: Figure


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _round_label(history: RunHistory, server_round: int) -> str:
    return "final" if history.total_rounds is not None and server_round >= history.total_rounds \
        else str(server_round)


def _round_axis(ax: object, history: RunHistory, rounds: Sequence[int]) -> None:
    ax.set_xticks(list(rounds), [_round_label(history, r) for r in rounds])  # type: ignore[attr-defined]
    ax.set_xlabel("round")  # type: ignore[attr-defined]


def scores_figure(history: RunHistory) -> Figure | None:
    """Each silo's score per round, the MTA per round and the MTAL."""
    scores = {s: points for s, points in history.scores().items() if points}
    if not scores:
        return None
    figure = _figure(8, 4.5)
    ax = figure.add_subplot()
    for silo, points in scores.items():
        ax.plot([r for r, _ in points], [v for _, v in points], marker="o", linewidth=1,
                alpha=0.75, label=silo)
    mta = history.mta()
    ax.plot([r for r, _ in mta], [v for _, v in mta], color="black", linewidth=2.5,
            marker="s", label="MTA (mean over silos)")
    mtal = history.mtal()
    if mtal is not None:
        ax.axhline(mtal, color="grey", linestyle="--", linewidth=1, label=f"MTAL {mtal:.4f}")
    rounds = sorted({r for points in scores.values() for r, _ in points})
    _round_axis(ax, history, rounds)
    ax.set_ylabel(history.metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure


def _short(module: str) -> str:
    """model.layers.3.self_attn.q_proj -> layer 3 q_proj."""
    found = re.search(r"(?:layers?|h|blocks?)\.(\d+)\.", module)
    tail = module.rsplit(".", 1)[-1]
    return f"layer {found.group(1)} {tail}" if found else module


def experts_figure(history: RunHistory) -> Figure | None:
    """Which domain experts each silo holds in each adapted module, at the last round
    that assigned experts (the silos' final architectures; FedAMoLE's Figure 8)."""
    server_round = history.experts_round()
    if server_round is None:
        return None
    silos, width, grid = history.expert_grid(server_round)
    modules = list(grid)
    kinds = list(dict.fromkeys(m.rsplit(".", 1)[-1] for m in modules))
    ncols = len(kinds) if len(kinds) <= 4 and len(modules) % len(kinds) == 0 \
        else min(4, len(modules))
    nrows = math.ceil(len(modules) / ncols)
    figure = _figure(ncols * (1.6 + 0.28 * width), nrows * (0.8 + 0.24 * len(silos)) + 0.6)
    axes = figure.subplots(nrows, ncols, squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= len(modules):
            ax.set_visible(False)
            continue
        module = modules[index]
        ax.imshow(grid[module], cmap="Blues", vmin=0, vmax=1.3, aspect="auto",
                  interpolation="nearest")
        ax.set_title(_short(module), fontsize=8)
        ax.set_xticks(range(width), [str(j) for j in range(width)], fontsize=6)
        ax.set_yticks(range(len(silos)), silos if index % ncols == 0 else [], fontsize=7)
        ax.set_xticks([x - 0.5 for x in range(1, width)], minor=True)
        ax.set_yticks([y - 0.5 for y in range(1, len(silos))], minor=True)
        ax.grid(which="minor", color="white", linewidth=1)
        ax.tick_params(which="minor", length=0)
    figure.suptitle(f"domain experts held (dark) per module, round "
                    f"{_round_label(history, server_round)}: silos x experts", fontsize=10)
    return figure


def experts_count_figure(history: RunHistory) -> Figure | None:
    """Each silo's mean number of domain experts per module, per round."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in history.rounds:
        if line.get("final"):  # the final plan only evaluates: no new architecture
            continue
        for silo, row in line["silos"].items():
            series.setdefault(silo, []).append((line["round"], float(row.get("experts_mean", 0))))
    if not any(v for points in series.values() for _, v in points):
        return None
    figure = _figure(8, 3.5)
    ax = figure.add_subplot()
    for silo, points in series.items():
        ax.plot([r for r, _ in points], [v for _, v in points], marker="o", label=silo)
    _round_axis(ax, history, sorted({r for points in series.values() for r, _ in points}))
    ax.set_ylabel("domain experts per module (mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure


def bytes_figure(history: RunHistory) -> Figure:
    """Bytes up (silos -> aggregator) and down per round, summed over silos."""
    rows = history.bytes_per_round()
    figure = _figure(8, 3.5)
    ax = figure.add_subplot()
    rounds = [r for r, _, _ in rows]
    ax.bar([r - 0.2 for r in rounds], [u / 1e6 for _, u, _ in rows], width=0.4, label="up")
    ax.bar([r + 0.2 for r in rounds], [d / 1e6 for _, _, d in rows], width=0.4, label="down")
    _round_axis(ax, history, rounds)
    ax.set_ylabel("MB (all silos)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return figure


def times_figure(history: RunHistory) -> Figure:
    """Per round: wall time, the slowest silo's training and test, the aggregation."""
    rows = history.round_times()
    figure = _figure(8, 3.5)
    ax = figure.add_subplot()
    rounds = [int(row["round"] or 0) for row in rows]
    parts = [("round_s", "round (wall)"), ("train_s", "slowest silo: training"),
             ("test_s", "slowest silo: test"), ("aggregate_s", "aggregation")]
    shown = [(key, label) for key, label in parts if any(row[key] is not None for row in rows)]
    step = 0.8 / len(shown)
    for i, (key, label) in enumerate(shown):
        ax.bar([r - 0.4 + step * (i + 0.5) for r in rounds],
               [float(row[key] or 0.0) for row in rows], width=step, label=label)
    _round_axis(ax, history, rounds)
    ax.set_ylabel("seconds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return figure


def privacy_figure(history: RunHistory) -> Figure | None:
    """Each silo's epsilon spent after each round, against its budget."""
    spends = {s: p for s, p in history.privacy.items() if p.by_round}
    if not spends:
        return None
    figure = _figure(8, 3.5)
    ax = figure.add_subplot()
    for silo, spend in spends.items():
        ax.plot([r for r, _ in spend.by_round], [e for _, e in spend.by_round], marker="o",
                alpha=0.75, label=silo)
    for budget in sorted({p.budget for p in spends.values() if math.isfinite(p.budget)}):
        ax.axhline(budget, color="red", linestyle="--", linewidth=1,
                   label=f"budget epsilon {budget:g}")
    _round_axis(ax, history, sorted({r for p in spends.values() for r, _ in p.by_round}))
    ax.set_ylim(bottom=0)
    ax.set_ylabel("epsilon spent (cumulative)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure


def sections(history: RunHistory) -> list[Section]:
    """The report's figures, those the run has data for, in page order."""
    metric = history.metric
    candidates = [
        ("scores", f"{metric} per round and silo", scores_figure,
         f"Each silo's {metric} on its own test split, per round it was scored; the black "
         "line is the MTA, the dashed one the MTAL. " + MTAL_DEFINITION),
        ("experts", "each silo's experts per module", experts_figure,
         "Which domain experts each silo holds (dark cells) in every adapted module, rows "
         "silos, columns experts, at the last round that assigned them: the personalised "
         "architectures (cf. FedAMoLE's Figure 8). Shared experts are not shown."),
        ("experts_count", "experts per silo over rounds", experts_count_figure,
         "Each silo's number of domain experts per module, averaged over modules, per round."),
        ("bytes", "bytes up and down per round", bytes_figure,
         "What crossed the wire per round, summed over silos: uploads (up) and plans (down), "
         "as encoded, signed and encrypted."),
        ("times", "round times", times_figure,
         "Per round: wall time from the plans going out to the close (where recorded), the "
         "slowest silo's training and test seconds, and the aggregation."),
        ("privacy", "privacy spent", privacy_figure,
         "Each silo's epsilon spent (at its delta) after each round, from its privacy "
         "ledger, with the budget dashed. A deployment's ledgers stay with the silos: give "
         "their state_dirs with --silo-dir."),
    ]
    out = []
    for name, title, draw, caption in candidates:
        figure = draw(history)
        if figure is not None:
            out.append(Section(name, title, caption, figure))
    return out


def render_page(history: RunHistory, images: Sequence[tuple[Section, bytes]]) -> str:
    """One self-contained HTML page: the figures embedded as base64 PNG, no external
    asset, so the file alone can be sent or archived."""
    e = html.escape
    mtal = history.mtal()
    totals = history.bytes_by_silo()
    latest = history.latest()
    last_experts: dict[str, float] = {}
    for line in history.rounds:
        for silo, row in line["silos"].items():
            if row.get("experts_max"):  # the final plan of some strategies names none
                last_experts[silo] = float(row.get("experts_mean", 0))
    done = [line["round"] for line in history.rounds if not line.get("final")]
    facts = [
        ("source", f"{history.kind}: {history.path}"),
        ("run", history.name),
        ("strategy", history.strategy),
        ("rounds done", f"{len(done)} of {history.total_rounds}"
         + (" (complete)" if history.complete else " (not complete)")),
        ("MTAL", "-" if mtal is None else f"{mtal:.4f} ({history.metric})"),
        ("bytes up / down, whole run",
         f"{sum(u for u, _ in totals.values()) / 1e6:.3f} MB / "
         f"{sum(d for _, d in totals.values()) / 1e6:.3f} MB"),
        ("fedsilo", history.fedsilo_version or "not recorded"),
        ("created", history.created_at or "not recorded"),
    ]
    rows = []
    for silo in history.silos:
        spend = history.privacy.get(silo)
        up, down = totals.get(silo, (0, 0))
        score = latest.get(silo)
        rows.append(
            f"<tr><td>{e(silo)}</td><td>{'-' if score is None else f'{score:.4f}'}</td>"
            f"<td>{last_experts.get(silo, 0):.1f}</td><td>{up / 1e6:.3f}</td>"
            f"<td>{down / 1e6:.3f}</td>"
            f"<td>{'-' if spend is None else f'{spend.spent:.3g} of {spend.budget:g}'}</td></tr>"
        )
    figures = []
    for section, png in images:
        data = base64.b64encode(png).decode("ascii")
        figures.append(
            f'<section><h2>{e(section.title)}</h2><img alt="{e(section.title)}" '
            f'src="data:image/png;base64,{data}"><p>{e(section.caption)}</p></section>'
        )
    fact_rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>fedsilo report: {e(history.name)}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
img {{ max-width: 100%; }}
.definition {{ background: #f4f4f4; padding: 0.6em 1em; }}
</style></head><body>
<h1>fedsilo report: {e(history.name)}</h1>
<table>{fact_rows}</table>
<p class="definition"><b>MTA and MTAL.</b> {e(MTAL_DEFINITION)}</p>
<h2>silos</h2>
<table><tr><th>silo</th><th>latest {e(history.metric)}</th><th>experts per module
(last round)</th><th>up MB (run)</th><th>down MB (run)</th><th>epsilon spent</th></tr>
{"".join(rows)}</table>
{"".join(figures)}
</body></html>
"""
