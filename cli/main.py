"""The `fedsilo` command."""

from __future__ import annotations

import importlib.metadata
import logging
import signal
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from fedsilo.cli.keys import keys_app, provision_command, trust_app
from fedsilo.cli.output import PROGRESS_MODES, ServiceOutput
from fedsilo.cli.personalised import evaluate_command, export_command, generate_command
from fedsilo.cli.report import report_command
from fedsilo.simulation.config import SimulationConfig

app = typer.Typer(
    name="fedsilo",
    help="Personalised federated fine-tuning of LLMs across data silos (FedAMoLE).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_D = SimulationConfig()


def _fail(console: Console | ServiceOutput, message: str) -> typer.Exit:
    """One error line, exit code 2. The message is shown as written (escaped: a `[strategy]`
    in it is text, not console markup) and not wrapped, so it greps and pastes whole."""
    if isinstance(console, ServiceOutput):
        return console.fail(message)
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def _version(show: bool) -> None:
    if show:
        try:
            version = importlib.metadata.version("fedsilo")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown (not installed: run `pip install -e .`)"
        typer.echo(f"fedsilo {version}")
        raise typer.Exit(0)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True,
        help="Print fedsilo's version and exit.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
def simulate(
    ctx: typer.Context,
    silos: Annotated[int, typer.Option(help="Number of silos (C).")] = _D.silos,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = _D.rounds,
    local_steps: Annotated[int, typer.Option(help="Local training steps per round.")] = (
        _D.local_steps
    ),
    strategy: Annotated[
        str, typer.Option(help="fedamole | fedlease | fedit | fedit-ft | fdlora | local.")
    ] = _D.strategy,
    experts: Annotated[int, typer.Option(help="Domain experts per module (E).")] = (
        _D.num_experts
    ),
    k_e: Annotated[int, typer.Option("--k-e", help="Experts each token is routed to.")] = (
        _D.top_k
    ),
    k_c: Annotated[int, typer.Option("--k-c", help="Silos each expert selects.")] = _D.k_c,
    b: Annotated[int, typer.Option("--b", help="Max experts per module per silo.")] = _D.b,
    min_contributors: Annotated[int, typer.Option(
        help="A tensor fewer silos trained in a round keeps its value (1: publish even one "
        "silo's update as it trained it).")] = _D.min_contributors,
    assignment: Annotated[str, typer.Option(help="rsea | random | static.")] = _D.assignment,
    solver: Annotated[str, typer.Option(help="flow (exact min-cost flow, OR-Tools) | scip "
                                        "(the paper's MILP) | lp (HiGHS).")] = (
        _D.solver
    ),
    relevance: Annotated[
        str, typer.Option(help="How experts score silos in RSEA: paper | standardised | "
                          "trainers | anchor (see README).")
    ] = _D.relevance,
    temperature: Annotated[
        float, typer.Option(help="RSEA: temperature of the softmax over silos.")
    ] = _D.temperature,
    stickiness: Annotated[
        float, typer.Option(help="RSEA: preference (x 1/C) for an expert's last trainers.")
    ] = _D.stickiness,
    client_embedding: Annotated[
        str, typer.Option(help="RSEA: a silo's client embedding from the parameters as "
                          "trained | received (before local training).")
    ] = _D.client_embedding,
    warmup_rounds: Annotated[
        int, typer.Option(help="FedLEASE: warm-up rounds before the silos are clustered.")
    ] = _D.warmup_rounds,
    max_clusters: Annotated[
        int, typer.Option(help="FedLEASE: most experts (clusters) per module.")
    ] = _D.max_clusters,
    sync_every: Annotated[
        int, typer.Option(help="FDLoRA: rounds between personal <- shared resets.")
    ] = _D.sync_every,
    data: Annotated[
        str | None,
        typer.Option(help="Real data: agnews | sst2 | snli | dolly | a .toml dataset "
                     "description of your own data file (path, kind, template, columns: see "
                     "README), or several separated by commas (silo i holds the (i mod n)-th); "
                     "default: built-in synthetic multi-task set."),
    ] = None,
    data_dir: Annotated[
        str | None,
        typer.Option(help="Folder of the real data sets (default $FEDSILO_DATA_DIR or "
                     "../shared/data)."),
    ] = None,
    partition: Annotated[str, typer.Option(help="dirichlet | label | iid.")] = _D.partition,
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration.")] = _D.alpha,
    examples_per_silo: Annotated[int, typer.Option(help="Examples drawn per silo.")] = (
        _D.examples_per_silo
    ),
    model: Annotated[
        str, typer.Option(help="builtin:tiny | smollm2 | a local HF folder | a .gguf file.")
    ] = _D.model,
    lr: Annotated[float, typer.Option(help="Learning rate (decays x0.99 per round).")] = _D.lr,
    batch_size: Annotated[int, typer.Option(help="Training batch size.")] = _D.batch_size,
    max_length: Annotated[int, typer.Option(help="Max tokens per example.")] = _D.max_length,
    eval_limit: Annotated[
        int | None, typer.Option(help="Score at most this many test examples per silo.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for data, init and assignment.")] = _D.seed,
    dp_epsilon: Annotated[
        float | None,
        typer.Option(help="Differentially private embedding uploads with this epsilon budget "
                     "over the run (default: off, as in the paper)."),
    ] = None,
    dp_clip: Annotated[
        float, typer.Option(help="Per-example L2 bound of the embeddings under DP.")
    ] = _D.dp_clip,
    out: Annotated[Path, typer.Option(help="Folder for run folders.")] = Path(_D.out_dir),
    resume: Annotated[Path | None, typer.Option(
        help="Continue the interrupted run in this run folder from its last completed round, "
        "with the settings it began with.")] = None,
) -> None:
    """Run a whole federation in one process (no broker, no downloads by default)."""
    console = Console()
    from fedsilo.cli.display import RichObserver

    config = replace(
        _D, silos=silos, rounds=rounds, local_steps=local_steps, strategy=strategy,
        num_experts=experts, top_k=k_e, k_c=k_c, b=b, min_contributors=min_contributors,
        assignment=assignment, solver=solver, relevance=relevance, temperature=temperature,
        stickiness=stickiness,
        client_embedding=client_embedding,
        data=data, data_dir=data_dir, partition=partition, alpha=alpha,
        examples_per_silo=examples_per_silo, model=model, lr=lr, batch_size=batch_size,
        max_length=max_length, eval_limit=eval_limit, seed=seed, out_dir=str(out),
        dp_epsilon=dp_epsilon, dp_clip=dp_clip, warmup_rounds=warmup_rounds,
        max_clusters=max_clusters, sync_every=sync_every,
    )
    from fedsilo.simulation.engine import run_simulation
    from fedsilo.simulation.state import (
        SimulationInterrupted,
        completed_round,
        option_field,
        resume_config,
    )

    given = [p for p in ctx.params  # typer may vendor click: its enum, compared by name
             if getattr(ctx.get_parameter_source(p), "name", "") == "COMMANDLINE"]
    observer = RichObserver(console)
    try:
        if resume is not None:  # the run's own settings; options given must agree with them
            config = resume_config(resume, config, given)
            done = completed_round(resume)
            console.print(f"resuming {resume}: " + (
                "no round was finished, starting at round 0" if done is None
                else f"rounds up to {done} are done, continuing at round {done + 1}"),
                markup=False, highlight=False, soft_wrap=True)
        config.strategy_config()
        flags = {option_field(flag): flag for flag in given}
        unread = config.unread_knobs(flags)
        if unread:  # a warning, not a refusal: one command line may serve every strategy
            console.print(f"note: --strategy {config.strategy} does not read " + ", ".join(
                f"--{flags[name].replace('_', '-')} (a setting of {' and '.join(owners)})"
                for name, owners in unread.items()
            ) + f"; {'it is' if len(unread) == 1 else 'they are'} ignored", style="yellow",
                markup=False, highlight=False, soft_wrap=True)
        console.print(
            f"[bold]fedsilo simulate[/]: {config.silos} silos, {config.rounds} rounds x "
            f"{config.local_steps} steps, strategy {config.strategy}, model {config.model}, "
            f"data {config.data or 'synthetic'}"
        )
        result = run_simulation(config, observer, run_dir=resume, resume=resume is not None)
    except SimulationInterrupted as stop:  # Ctrl-C: say where the run is and how to go on
        observer.stop()  # the live bar off the terminal before saying why
        console.print(stop.advice(), style="bold yellow", markup=False, highlight=False,
                      soft_wrap=True)  # the command stays one line, to copy
        raise typer.Exit(code=130) from None
    except KeyboardInterrupt:  # before the run folder held anything to continue
        observer.stop()  # the live bar off the terminal before saying why
        console.print("interrupted before the run folder was written: nothing to resume",
                      style="bold yellow")
        raise typer.Exit(code=130) from None
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(console, str(exc)) from None
    console.print(f"[bold green]MTAL {result.mtal:.4f}[/]  run folder: {result.run_dir}")


aggregator_app = typer.Typer(help="The coordinator's long-running process.",
                             no_args_is_help=True)
agent_app = typer.Typer(help="A silo's long-running process.", no_args_is_help=True)
app.add_typer(aggregator_app, name="aggregator")
app.add_typer(agent_app, name="agent")
app.add_typer(keys_app, name="keys")
app.add_typer(trust_app, name="trust")
app.command("provision")(provision_command)
app.command("report")(report_command)
app.command("export")(export_command)
app.command("generate")(generate_command)
app.command("evaluate")(evaluate_command)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="The TOML config file.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key: --set rounds.deadline_s=60 "
                 "(repeatable; FEDSILO_<SECTION>__<KEY> variables work too)."),
]
LogJsonOption = Annotated[
    bool, typer.Option("--log-json", help="One JSON object per log line (for log shippers).")
]
PrintOption = Annotated[
    bool, typer.Option("--print-config", help="Print the effective config (secrets masked).")
]
LogFileOption = Annotated[
    Path | None, typer.Option("--log-file", help="Append every output line to this file "
                              "instead of stderr (errors are repeated on stderr).")
]
ProgressOption = Annotated[
    str, typer.Option("--progress", help=f"Progress bars: {' | '.join(PROGRESS_MODES)}; auto "
                      "draws them only when stderr is a terminal this process has to itself "
                      "(not a background job `&`, a pipe or a file) and without --log-json.")
]


@aggregator_app.command("run")
def aggregator_run(
    config: ConfigOption,
    set_: SetOption = None,
    log_json: LogJsonOption = False,
    print_config: PrintOption = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    log_file: LogFileOption = None,
) -> None:
    """Coordinate a federation over RabbitMQ; resumes from its state_dir after a stop."""
    from fedsilo.aggregator.config import FederationConfig
    from fedsilo.aggregator.service import AggregatorService

    out = ServiceOutput.open("aggregator", log_json, log_file, "off", verbose)
    cfg = _load(out, FederationConfig, config, set_, print_config)
    service = AggregatorService(cfg)
    _run_service(out, service, "aggregator")
    state = service.state
    if state.phase == "done":
        out.say("aggregator_exit", f"federation {cfg.name} finished; results in "
                f"{cfg.state_dir}/summary.json", "bold green", finished=True,
                summary=str(cfg.state_dir / "summary.json"))
    else:
        out.say("aggregator_exit", f"stopped in round {state.round} ({state.phase}); run the "
                "same command again to resume", finished=False, round=state.round,
                phase=state.phase)


@agent_app.command("start")
def agent_start(
    config: ConfigOption,
    set_: SetOption = None,
    log_json: LogJsonOption = False,
    print_config: PrintOption = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    log_file: LogFileOption = None,
    progress: ProgressOption = "auto",
) -> None:
    """Join a federation as one silo; resumes from its state_dir after a stop."""
    from fedsilo.cli.progress import TrainingProgress, TransferProgress
    from fedsilo.silo_agent.config import SiloConfig
    from fedsilo.silo_agent.service import AgentService

    out = ServiceOutput.open("agent", log_json, log_file, progress, verbose)
    cfg = _load(out, SiloConfig, config, set_, print_config)
    out.name = f"agent {cfg.silo_id}"
    observer = TrainingProgress(out.console, cfg.silo_id) if out.progress else None
    transfers = TransferProgress(out.console) if out.progress else None
    service = AgentService(cfg, observer=observer, progress=transfers)
    _run_service(out, service, f"agent {cfg.silo_id}")
    if service.state.finished:
        out.say("agent_exit", f"{cfg.silo_id} finished; personalised adapter in "
                f"{cfg.state_dir}/adapter.safetensors", "bold green", silo=cfg.silo_id,
                finished=True, adapter=str(cfg.state_dir / "adapter.safetensors"))
    else:
        out.say("agent_exit", f"{cfg.silo_id} stopped; run the same command again to resume",
                silo=cfg.silo_id, finished=False)


@agent_app.command("privacy")
def agent_privacy(
    config: ConfigOption,
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the ledger summary as JSON.")]
    = False,
) -> None:
    """What this silo has released under differential privacy, and the epsilon spent."""
    from fedsilo.cli.display import render_privacy
    from fedsilo.privacy.silo import SiloPrivacy
    from fedsilo.silo_agent.config import SiloConfig
    from fedsilo.silo_agent.service import recorded_ledger

    console = Console()
    cfg = _load(console, SiloConfig, config, set_, False)
    try:
        # Read-only: no lock, so it never blocks a running agent; checked against the
        # checkpoint (read first) like the agent's start-up, so a deleted or replaced ledger
        # is reported as such, not as nothing spent.
        recorded = recorded_ledger(cfg.state_dir)
        privacy = SiloPrivacy.open(cfg.dp, cfg.state_dir, cfg.silo_id, read_only=True,
                                   recorded=recorded)
    except ValueError as exc:
        raise _fail(console, str(exc)) from None
    summary = privacy.ledger.summary()
    if as_json:
        console.print_json(data=summary)
    else:
        render_privacy(console, cfg.silo_id, cfg.dp, summary)


@app.command()
def digest(
    model: Annotated[str, typer.Argument(help="builtin:tiny | smollm2 | a Hugging Face "
                                          "folder | a .gguf file, as in silo.toml.")],
    dtype: Annotated[str, typer.Option(help="The silos' dtype (silo.toml).")] = "float32",
    seed: Annotated[int, typer.Option(help="The silos' seed (built-in models only).")] = 0,
) -> None:
    """Print the SHA-256 of a base model's weights: federation.toml's model_digest."""
    from fedsilo.sdk.models.digest import weights_digest
    from fedsilo.sdk.models.loading import ModelLoadError, load_model

    console = Console()
    try:
        loaded = load_model(model, dtype=dtype, seed=seed)
    except (ModelLoadError, ValueError, OSError) as exc:
        raise _fail(console, f"cannot load {model!r}: {exc}") from None
    typer.echo(weights_digest(loaded.model))


@app.command("dead-letters")
def dead_letters(
    config: Annotated[Path, typer.Option("--config", "-c", help="The federation.toml.")],
    limit: Annotated[int, typer.Option(help="Show at most this many (oldest first).")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON rows.")] = False,
) -> None:
    """List the refused messages the broker keeps (fedsilo.dead) and why each was refused;
    they stay in the queue."""
    from fedsilo.aggregator.config import FederationConfig
    from fedsilo.cli.dead_letters import describe_all, render_dead_letters
    from fedsilo.cli.status import read_status
    from fedsilo.sdk.transport.amqp_connection import BrokerUnavailable

    console = Console()
    cfg = _load(console, FederationConfig, config, None, False)
    try:
        transport = cfg.broker.connect("aggregator", cfg.silos,
                                       codec=cfg.security.codec("aggregator", cfg.name))
    except BrokerUnavailable as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=4) from None
    except ValueError as exc:
        raise _fail(console, str(exc)) from None
    try:
        letters = transport.peek_dead_letters(limit)
    finally:
        transport.close()
    try:
        refusals = read_status(cfg.state_dir).get("refusals", [])
    except (OSError, ValueError):
        refusals = []
    rows = describe_all(letters, refusals)
    if as_json:
        console.print_json(data=rows)
    else:
        render_dead_letters(console, rows)


@app.command()
def status(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="The federation.toml.")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="The aggregator's state_dir (instead of --config).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw status JSON.")] = False,
) -> None:
    """Show the federation as the aggregator sees it: round, deadline, uploads, errors."""
    from fedsilo.cli.status import read_status, render_status

    console = Console()
    if state_dir is None:
        if config is None:
            raise _fail(console, "give --config federation.toml or --state-dir")
        from fedsilo.aggregator.config import FederationConfig

        state_dir = _load(console, FederationConfig, config, None, False).state_dir
    try:
        data = read_status(state_dir)
    except (OSError, ValueError) as exc:
        raise _fail(console, str(exc)) from None
    if as_json:
        console.print_json(data=data)
    else:
        render_status(console, data)


def _load(console: Console | ServiceOutput, cls: type, path: Path,
          overrides: list[str] | None, show: bool) -> Any:
    from fedsilo.sdk.config import ConfigError, dump_toml, load_config

    try:
        cfg = load_config(cls, path, overrides or ())
    except ConfigError as exc:
        raise _fail(console, f"invalid configuration:\n{exc}") from None
    if show:
        typer.echo(dump_toml(cfg))
        raise typer.Exit(0)
    return cfg


def _run_service(out: ServiceOutput, service: Any, name: str) -> None:
    """Run with SIGTERM/SIGINT turned into a graceful stop; errors become one clear line
    and an exit code: 2 bad input, 3 federation aborted, 4 broker unreachable."""
    from fedsilo.aggregator.service import FederationAborted
    from fedsilo.sdk.checkpoint import CheckpointError
    from fedsilo.sdk.data.examples import DataError
    from fedsilo.sdk.models.loading import ModelLoadError
    from fedsilo.sdk.transport.amqp_connection import BrokerUnavailable, SiloAlreadyConnected
    from fedsilo.silo_agent.service import PrivacyBudgetExhausted

    signals = {"count": 0}

    def on_signal(signum: int, frame: object) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            raise KeyboardInterrupt
        service.request_stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        service.run()
    except BrokerUnavailable as exc:
        raise out.fail(str(exc), code=4) from None
    except (FederationAborted, PrivacyBudgetExhausted) as exc:
        raise out.fail(str(exc), code=3, label="aborted") from None
    except (ValueError, FileNotFoundError, DataError, ModelLoadError, CheckpointError,
            SiloAlreadyConnected) as exc:
        raise out.fail(f"{name}: {exc}") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    app()
