"""The `worker-orcd` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="worker-orcd: serve one GGUF model")
console = Console()


@app.callback()
def _group() -> None:
    """worker-orcd: serve one GGUF model."""


def _model_path(model: Path | None) -> Path:
    if model is not None:
        return model
    from worker_orcd.packaged import default_model_path

    return default_model_path()


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code=1)


ModelArg = Annotated[Path | None, typer.Argument(help="GGUF file (default: the packaged model)")]


@app.command()
def inspect(path: ModelArg = None) -> None:
    """Metadata, tensor types and counts, total bytes and estimated VRAM for the weights."""
    from worker_orcd.gguf import GGUFError, open_gguf
    from worker_orcd.inspect import human_bytes, model_facts
    from worker_orcd.packaged import ModelNotInstalled

    try:
        with open_gguf(_model_path(path)) as f:
            facts = model_facts(f)
    except (GGUFError, ModelNotInstalled) as e:
        _fail(str(e))

    head = Table(title=f"{facts.path}", show_header=False)
    head.add_row("architecture", facts.architecture)
    head.add_row("name", str(facts.name))
    head.add_row("GGUF version", str(facts.version))
    head.add_row("parameters", f"{facts.parameters / 1e6:.1f} M")
    tokenizer = f"{facts.tokenizer_model} (pre: {facts.tokenizer_pre}), {facts.vocab_size} tokens"
    head.add_row("tokenizer", tokenizer)
    for k, v in facts.hyperparameters.items():
        head.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
    console.print(head)

    types = Table(title="tensors by type")
    types.add_column("type")
    types.add_column("tensors", justify="right")
    types.add_column("bytes", justify="right")
    for name, (count, nbytes) in facts.types.items():
        types.add_row(name, str(count), human_bytes(nbytes))
    types.add_row("[b]total", f"[b]{facts.tensor_count}", f"[b]{human_bytes(facts.weight_bytes)}")
    console.print(types)
    console.print(
        f"estimated VRAM for weights (kept in their GGUF types): [b]{human_bytes(facts.weight_bytes)}[/b]; "
        f"KV cache (f16): {human_bytes(facts.kv_bytes_per_token)} per token"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
