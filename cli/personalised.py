"""`fedsilo export`, `fedsilo generate`, `fedsilo evaluate`: use a silo's personalised model.

The library code is `fedsilo.sdk.personalised`; this module adds what only the CLI knows:
the files of older runs and agents (a run's config.json, an agent's checkpoint and
silo.toml) to fill in what an older adapter file does not record, and the terminal output.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

SourceArgument = Annotated[Path, typer.Argument(
    help="A `fedsilo simulate` run folder (runs/<name>) or a silo agent's state_dir.")]
SiloOption = Annotated[str | None, typer.Option(
    "--silo", help="The silo, e.g. silo-0 (a state_dir holds one: not needed there).")]
AgentConfigOption = Annotated[Path | None, typer.Option(
    "--config", "-c", help="The agent's silo.toml: names the base model and data for a "
    "state_dir written by an older fedsilo.")]
BaseModelOption = Annotated[str | None, typer.Option(
    "--base-model", help="Where the base model is on this machine, when not where the run "
    "had it (its weights must be the same: the digest is checked).")]


def _fail(console: Console, message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


@contextmanager
def _errors(console: Console) -> Iterator[None]:
    """Bad input of any kind: one line saying what and what to do, exit code 2."""
    from fedsilo.sdk.config import ConfigError
    from fedsilo.sdk.data.examples import DataError
    from fedsilo.sdk.personalised import PersonalisedError

    try:
        yield
    except ConfigError as exc:
        raise _fail(console, f"invalid configuration:\n{exc}") from None
    except (PersonalisedError, DataError, ValueError, OSError) as exc:
        raise _fail(console, str(exc)) from None


def legacy_defaults(adapter: Path, silo: str, agent_config: Path | None) -> dict[str, Any]:
    """What an adapter file written before adapters recorded their provenance lacks, from
    the files beside it: a run folder's config.json, or an agent's checkpoint (strategy,
    adapter, training) and its silo.toml (base model, data)."""
    from fedsilo.sdk.personalised.record import read_metadata

    if {"strategy", "adapter", "base_model", "data", "training"} <= set(read_metadata(adapter)):
        return {}
    folder = adapter.parent
    run_config = folder.parent.parent / "config.json"
    if folder.parent.name == "silos" and run_config.is_file():
        return _run_defaults(run_config, silo)
    return _agent_defaults(folder, agent_config)


def _run_defaults(path: Path, silo: str) -> dict[str, Any]:
    from fedsilo.sdk.personalised.config import BaseModelRef, PersonalisedError
    from fedsilo.simulation.engine import SimulationConfig, silo_ids

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        known = {k: v for k, v in raw.items() if k in SimulationConfig.field_names()}
        if "target_modules" in known:
            known["target_modules"] = tuple(known["target_modules"])
        config = SimulationConfig(**known)
    except (OSError, ValueError, TypeError) as exc:
        raise PersonalisedError(f"cannot read the run's settings in {path}: {exc}") from None
    out: dict[str, Any] = {
        "strategy": config.strategy, "adapter": config.adapter(),
        "training": config.training(),
        "base_model": BaseModelRef(config.model, config.dtype, config.seed),
    }
    ids = silo_ids(config.silos)
    if silo in ids:
        out["data"] = config.data_recipe(ids.index(silo))
    return out


def _agent_defaults(state_dir: Path, agent_config: Path | None) -> dict[str, Any]:
    from fedsilo.sdk.checkpoint import load_checkpoint
    from fedsilo.sdk.federation import FederationSetup
    from fedsilo.sdk.personalised.config import BaseModelRef
    from fedsilo.silo_agent.service import CHECKPOINT, silo_data_recipe

    out: dict[str, Any] = {}
    checkpoint = state_dir / CHECKPOINT
    if checkpoint.is_file():
        setup = load_checkpoint(checkpoint)[1].get("setup")
        if setup:
            federation = FederationSetup.from_json(setup)
            out.update(strategy=federation.strategy.name,
                       adapter=federation.resolved_adapter(), training=federation.training)
    if agent_config is not None:
        from fedsilo.sdk.config import load_config
        from fedsilo.silo_agent.config import SiloConfig

        config = load_config(SiloConfig, agent_config)
        out["base_model"] = BaseModelRef(config.model, config.dtype, config.seed)
        out["data"] = silo_data_recipe(config)
    return out


def _read_run(source: Path, silo: str | None, agent_config: Path | None) -> Any:
    from dataclasses import replace

    from fedsilo.sdk.personalised import locate_silo_adapter, read_silo_run

    path, silo_id = locate_silo_adapter(source, silo)
    run = read_silo_run(path, legacy_defaults(path, silo_id, agent_config))
    return run if run.silo_id else replace(run, silo_id=silo_id)


def export_command(
    source: SourceArgument,
    out: Annotated[Path, typer.Option("--out", "-o", help="The folder to write.")],
    silo: SiloOption = None,
    merged: Annotated[bool, typer.Option(
        "--merged", help="Also write the base model with the LoRA merged in (plain-LoRA "
        "strategies: fedit, fedit-ft, fdlora, local).")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an earlier export in --out.")] = False,
    base_model: BaseModelOption = None,
    config: AgentConfigOption = None,
) -> None:
    """Write a silo's personalised model as a folder that loads on its own
    (fedsilo.load_personalised; a PEFT adapter too for plain-LoRA strategies)."""
    from fedsilo.sdk.personalised import export_run

    console = Console()
    with _errors(console):
        run = _read_run(source, silo, config)
        exported = export_run(run, out, merged=merged, force=force, base_model=base_model)
    experts = sorted({len(ids) for ids in exported.assignment.values()})
    shown = "-".join(map(str, (experts[0], experts[-1])[: 1 + (len(experts) > 1)]))
    console.print(
        f"[bold green]exported[/] {exported.silo_id} ({exported.strategy}, base "
        f"{exported.base_model.source}, r={exported.adapter.r}, "
        f"{shown} experts per module) to {out}: " + ", ".join(exported.files.values()),
        highlight=False, soft_wrap=True)
    console.print(f"try: fedsilo generate {out} \"...\"", markup=False, highlight=False)


def _fields(pairs: list[str] | None) -> dict[str, str]:
    from fedsilo.sdk.personalised import PersonalisedError

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise PersonalisedError(f"--field {pair!r}: write it as NAME=VALUE, e.g. "
                                    "--field context='the text it refers to'")
        out[key.strip()] = value
    return out


def generate_command(
    folder: Annotated[Path, typer.Argument(help="A folder `fedsilo export` wrote.")],
    prompt: Annotated[str, typer.Argument(help="The text to complete (put into the silo's "
                                          "prompt template unless --raw).")],
    max_new_tokens: Annotated[int | None, typer.Option(
        min=1, help="Most tokens to generate (default: the run's max_new_tokens).")] = None,
    sample: Annotated[bool, typer.Option(
        "--sample", help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(min=1e-6, help="With --sample.")] = 1.0,
    top_p: Annotated[float, typer.Option(min=1e-6, max=1.0, help="With --sample.")] = 1.0,
    seed: Annotated[int, typer.Option(help="With --sample: the same seed, the same text.")] = 0,
    raw: Annotated[bool, typer.Option(
        "--raw", help="Use PROMPT exactly as given, not in the template.")] = False,
    field: Annotated[list[str] | None, typer.Option(
        "--field", help="Another template field, NAME=VALUE (e.g. context=..., "
        "hypothesis=...); repeatable.")] = None,
    base_model: BaseModelOption = None,
) -> None:
    """Print the personalised model's completion of PROMPT."""
    from fedsilo.sdk.personalised import complete, load_personalised, read_personalised_config

    console = Console(stderr=True)
    with _errors(console):
        config = read_personalised_config(folder)
        extra = _fields(field)
        if raw or config.prompt is None:
            if config.prompt is None and not raw:
                console.print("note: the export records no prompt format; using the prompt "
                              "as given", highlight=False)
            text = prompt
        else:
            text = config.prompt.render(prompt, extra)
        model, tokenizer = load_personalised(folder, base_model)
        completion = complete(model, tokenizer, text,
                              max_new_tokens=max_new_tokens or config.max_new_tokens,
                              sample=sample, temperature=temperature, top_p=top_p, seed=seed)
    typer.echo(completion)


@contextmanager
def _progress_bar(show: bool, what: str) -> Iterator[Any]:
    """A transient bar on stderr while scoring, only when the output is a terminal."""
    if not show:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    progress = Progress("[bold]{task.description}", BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=Console(stderr=True), transient=True)
    task = progress.add_task(what, total=None)
    with progress:
        yield lambda done, total: progress.update(task, completed=done, total=total)


def evaluate_command(
    source: SourceArgument,
    silo: SiloOption = None,
    data: Annotated[str | None, typer.Option(
        "--data", help="Score other data: a preset (agnews, sst2, snli, dolly) or a dataset "
        ".toml (default: the silo's own test split, as the run scored it).")] = None,
    data_dir: Annotated[str | None, typer.Option(
        help="Folder of the preset data sets (default $FEDSILO_DATA_DIR).")] = None,
    limit: Annotated[int | None, typer.Option(
        min=1, help="With --data: score a seeded random subset of this many examples.")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help='One JSON line: {"silo", "metric", "value"}.')] = False,
    base_model: BaseModelOption = None,
    config: AgentConfigOption = None,
) -> None:
    """Score a silo's personalised model: by default on its own test split, reproducing
    the run's final score for it."""
    from fedsilo.sdk.personalised import evaluate_run, spec_examples

    console = Console(stderr=True)
    with _errors(console):
        run = _read_run(source, silo, config)
        examples = task = None
        what = ""
        if data is not None:
            examples, task, what = spec_examples(data, data_dir, limit)
        show = sys.stdout.isatty() and sys.stderr.isatty()
        with _progress_bar(show, f"scoring {run.silo_id}") as progress:
            score = evaluate_run(run, examples, task, what, base_model=base_model,
                                 progress=progress)
    if as_json:
        typer.echo(json.dumps(score.to_json()))
        return
    line = (f"{score.silo_id}: {score.metric} {score.value:.4f} on {score.examples} "
            f"examples ({score.data})")
    recorded = _recorded_score(source, score.silo_id) if data is None else None
    if recorded is not None:
        same = "the same" if recorded == score.value else "DIFFERENT"
        line += f"; the run's final score {recorded:.4f} ({same})"
    typer.echo(line)


def _recorded_score(source: Path, silo: str) -> float | None:
    """The run's final score for `silo` from its summary.json, when it has one."""
    try:
        value = json.loads((source / "summary.json").read_text())["per_silo"][silo]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, int | float) else None
