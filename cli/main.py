"""The `fedsilo` command."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedsilo.cli.simulation import SimulationConfig, run_simulation

app = typer.Typer(
    name="fedsilo",
    help="Personalised federated fine-tuning of LLMs across data silos (FedAMoLE).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_D = SimulationConfig()


def _fail(console: Console, message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=2)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
def simulate(
    silos: Annotated[int, typer.Option(help="Number of silos (C).")] = _D.silos,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = _D.rounds,
    local_steps: Annotated[int, typer.Option(help="Local training steps per round.")] = (
        _D.local_steps
    ),
    strategy: Annotated[str, typer.Option(help="fedamole | fedit | fedit-ft.")] = _D.strategy,
    experts: Annotated[int, typer.Option(help="Domain experts per module (E).")] = (
        _D.num_experts
    ),
    k_e: Annotated[int, typer.Option("--k-e", help="Experts each token is routed to.")] = (
        _D.top_k
    ),
    k_c: Annotated[int, typer.Option("--k-c", help="Silos each expert selects.")] = _D.k_c,
    b: Annotated[int, typer.Option("--b", help="Max experts per module per silo.")] = _D.b,
    assignment: Annotated[str, typer.Option(help="rsea | random | static.")] = _D.assignment,
    solver: Annotated[str, typer.Option(help="scip | flow (exact LP fast path).")] = (
        _D.solver
    ),
    data: Annotated[
        str | None,
        typer.Option(help="Real data: agnews | sst2 | snli | dolly (default: built-in "
                     "synthetic multi-task set)."),
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
    out: Annotated[Path, typer.Option(help="Folder for run folders.")] = Path(_D.out_dir),
) -> None:
    """Run a whole federation in one process (no broker, no downloads by default)."""
    console = Console()
    from fedsilo.cli.display import RichObserver

    config = replace(
        _D, silos=silos, rounds=rounds, local_steps=local_steps, strategy=strategy,
        num_experts=experts, top_k=k_e, k_c=k_c, b=b, assignment=assignment, solver=solver,
        data=data, data_dir=data_dir, partition=partition, alpha=alpha,
        examples_per_silo=examples_per_silo, model=model, lr=lr, batch_size=batch_size,
        max_length=max_length, eval_limit=eval_limit, seed=seed, out_dir=str(out),
    )
    try:
        config.strategy_config()
        console.print(
            f"[bold]fedsilo simulate[/]: {silos} silos, {rounds} rounds x {local_steps} steps, "
            f"strategy {strategy}, model {model}, data {data or 'synthetic'}"
        )
        result = run_simulation(config, RichObserver(console))
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(console, str(exc)) from None
    console.print(f"[bold green]MTAL {result.mtal:.4f}[/]  run folder: {result.run_dir}")


if __name__ == "__main__":
    app()
