"""The `worker-orcd` command line."""

from __future__ import annotations

import os
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
def inspect(
    path: ModelArg = None,
    check_values: Annotated[bool, typer.Option(
        "--check-values", help="dequantize every tensor and count NaN/inf (exit 1 if any)")] = False,
) -> None:
    """Metadata, tensor types and counts, total bytes and estimated VRAM for the weights."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from worker_orcd.engine.memory import human_bytes
    from worker_orcd.gguf import GGUFError, open_gguf
    from worker_orcd.inspect import model_facts, scan_values, value_table
    from worker_orcd.packaged import ModelNotInstalled

    try:
        with open_gguf(_model_path(path)) as f:
            facts = model_facts(f)
            counts = None
            if check_values:
                with Progress(TextColumn("scanning values"), BarColumn(), DownloadColumn(),
                              console=Console(stderr=True), transient=True) as bar:
                    task = bar.add_task("scan", total=None)
                    counts = scan_values(f, lambda done, total: bar.update(task, completed=done, total=total))
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
    if counts is not None:
        console.print(value_table(counts))
        bad = [c.name for c in counts if c.bad]
        if bad:
            _fail(f"{len(bad)} tensors hold NaN or inf values: {', '.join(bad[:10])}")


ModelOpt = Annotated[Path | None, typer.Option("--model", "-m", help="GGUF file (default: the packaged model)")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
CpuKernelsOpt = Annotated[str | None, typer.Option(
    "--cpu-kernels", help="CPU matmul path: auto | onednn (AVX-512) | portable (AVX2, ARM64) | reference "
    "(float32); default: $WORKER_ORCD_CPU_KERNELS or auto. Q4_0/Q4_1 take llama.cpp's integer dot products "
    "(compiled at first use) unless WORKER_ORCD_CPU_Q8DOT=0")]


def _force_cpu_kernels(name: str | None) -> None:
    """Decide the CPU kernels at load (one log line; a warning line per missing CPU feature)."""
    from worker_orcd.quant.cpu_caps import cpu_kernels, force

    try:
        force(name) if name is not None else cpu_kernels()
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def _load(model: Path | None, device: str, mmap: bool | None = None):
    """Load with a progress bar over the bytes moved to the device."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    import worker_orcd
    from worker_orcd.gguf import GGUFError
    from worker_orcd.packaged import ModelNotInstalled

    err = Console(stderr=True)
    with Progress(TextColumn("loading weights"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("load", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            return worker_orcd.load(model, device=device, progress=progress, mmap=mmap)
        except (GGUFError, ModelNotInstalled, RuntimeError, ValueError) as e:
            _fail(str(e))


@app.command()
def generate(
    model: ModelOpt = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="raw prompt text")] = None,
    chat: Annotated[str | None, typer.Option("--chat", help="a user message, rendered with the chat template")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", "-t")] = 0.8,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k")] = 0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: DeviceOpt = "auto",
    cpu_kernels: CpuKernelsOpt = None,
) -> None:
    """Generate text and stream it to stdout."""
    import sys
    import time

    if (prompt is None) == (chat is None):
        _fail("give exactly one of --prompt or --chat")
    _force_cpu_kernels(cpu_kernels)
    m = _load(model, device)
    if chat is not None:
        text = m.tokenizer.apply_chat_template([{"role": "user", "content": chat}], add_generation_prompt=True)
        ids = m.tokenize(text, add_special=False, parse_special=True)
        if m.tokenizer.add_bos and m.tokenizer.bos_id is not None and (not ids or ids[0] != m.tokenizer.bos_id):
            ids = [m.tokenizer.bos_id] + ids
    else:
        ids = m.tokenize(prompt, add_special=True)
    start, n = time.perf_counter(), 0
    try:
        for step in m.steps(ids, max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed):
            n += 1
            sys.stdout.write(step.text)
            sys.stdout.flush()
    except ValueError as e:
        _fail(str(e))
    elapsed = time.perf_counter() - start
    sys.stdout.write("\n")
    Console(stderr=True).print(f"[dim]{len(ids)} prompt tokens, {n} generated in {elapsed:.2f} s "
                               f"({n / elapsed:.1f} tokens/s incl. prefill)[/dim]")


@app.command()
def perplexity(
    file: Annotated[Path, typer.Option("--file", "-f", help="a UTF-8 text file")],
    model: ModelOpt = None,
    ctx: Annotated[int, typer.Option("--ctx", help="window length in tokens; the second half is scored")] = 512,
    max_windows: Annotated[int | None, typer.Option("--max-windows")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Perplexity of a text, with llama-perplexity's windows."""
    import json

    from worker_orcd.engine.perplexity import perplexity as run_perplexity

    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        _fail(f"{file}: {e}")
    m = _load(model, device)
    ids = m.tokenize(text, add_special=True)
    bos = m.tokenizer.bos_id if m.tokenizer.add_bos else None
    err = Console(stderr=True)

    def on_window(k: int, n: int, ppl: float) -> None:
        if not as_json:
            err.print(f"[{k}/{n}] ppl so far {ppl:.4f}")

    try:
        r = run_perplexity(m.logits, ids, ctx=ctx, bos_id=bos, max_windows=max_windows, on_window=on_window)
    except ValueError as e:
        _fail(str(e))
    if as_json:
        print(json.dumps({"ppl": r.ppl, "n_scored": r.n_scored, "n_windows": r.n_windows, "ctx": r.ctx,
                          "n_tokens": len(ids), "window_ppl": r.window_ppl}))
    else:
        console.print(f"perplexity {r.ppl:.4f} over {r.n_scored} tokens ({r.n_windows} windows of {ctx})")


@app.command()
def tokenize(
    text: Annotated[str, typer.Argument(help="text to tokenize")],
    model: ModelOpt = None,
    special: Annotated[bool, typer.Option("--special", help="parse special-token text like <|im_start|>")] = False,
    add_special: Annotated[bool, typer.Option("--add-special", help="add BOS/EOS as the model says")] = False,
) -> None:
    """Print the token ids of TEXT as JSON."""
    import json

    from worker_orcd.gguf import GGUFError
    from worker_orcd.packaged import ModelNotInstalled
    from worker_orcd.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(_model_path(model))
    except (GGUFError, ModelNotInstalled, ValueError) as e:
        _fail(str(e))
    print(json.dumps(tok.tokenize(text, add_special=add_special, parse_special=special)))


def _parse_size(text: str) -> int:
    """'20GiB', '8G', '512MB', '1073741824' -> bytes (K/M/G/T are powers of 1024)."""
    from worker_orcd.engine.memory import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def _check_memory(model: Path | None, device: str, cfg, limit: int | None) -> None:
    """Refuse before any weight is copied when weights + KV cache + workspace exceed --vram-limit or the free
    VRAM (estimated from the GGUF header; engine/memory.py)."""
    import logging

    from worker_orcd.api import resolve_device
    from worker_orcd.engine import memory
    from worker_orcd.gguf import GGUFError, open_gguf
    from worker_orcd.models.hparams import HParams
    from worker_orcd.packaged import ModelNotInstalled, default_model_path
    from worker_orcd.server.worker import kv_itemsize, plan_kv

    try:
        path = model or default_model_path()
        dev = resolve_device(device)
        with open_gguf(path) as f:
            kv_per_token = memory.kv_bytes_per_token(f, kv_itemsize(dev))
            ctx, slots = plan_kv(kv_per_token, HParams(f).int("context_length"), cfg)
            need = memory.estimate(f, ctx, slots, kv_itemsize(dev), cfg.prefill_chunk)
        memory.check_fits(need, dev, limit)
    except (GGUFError, ModelNotInstalled, RuntimeError, ValueError) as e:
        _fail(str(e))
    h = memory.human_bytes
    logging.getLogger("worker_orcd.server").info(
        "memory on %s: weights %s + KV cache %s (%d x %d tokens) + workspace %s = %s", dev, h(need.weights),
        h(need.kv_cache), slots, ctx, h(need.workspace), h(need.total))


@app.command()
def serve(
    model: ModelOpt = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="0: any free port")] = 8080,
    device: DeviceOpt = "auto",
    gpu_device: Annotated[int | None, typer.Option("--gpu-device", help="CUDA device index")] = None,
    worker_id: Annotated[str, typer.Option("--worker-id")] = "worker-0",
    callback_url: Annotated[str | None, typer.Option("--callback-url", help="orchestrator base URL")] = None,
    ctx: Annotated[int | None, typer.Option("--ctx", help="context per sequence (default: min(model, 4096))")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="sequences decoded together")] = 8,
    max_tokens_in: Annotated[int | None, typer.Option("--max-tokens-in")] = None,
    max_tokens_out: Annotated[int, typer.Option("--max-tokens-out")] = 2048,
    inference_timeout_sec: Annotated[float, typer.Option("--inference-timeout-sec")] = 300.0,
    kv_cache_size_mb: Annotated[int | None, typer.Option("--kv-cache-size-mb")] = None,
    gpu_memory_utilization: Annotated[float, typer.Option(
        "--gpu-memory-utilization", min=0.05, max=1.0,
        help="CUDA: the share of the card the worker fills; the KV pool takes what the weights leave "
             "(more blocks keep more prefixes cached)")] = 0.9,
    vram_limit: Annotated[str | None, typer.Option("--vram-limit", help="e.g. 8GiB")] = None,
    mmap: Annotated[bool | None, typer.Option("--mmap/--no-mmap", help="CPU: keep weights in the file's memory map "
                                              "(default: only models over 1 GiB; a mapped file must not be "
                                              "truncated while serving)")] = None,
    max_body_bytes: Annotated[int, typer.Option("--max-body-bytes", min=1,
                                                help="larger request bodies get 413 unread")] = 2 * 2**20,
    read_timeout_sec: Annotated[float, typer.Option("--read-timeout-sec", min=0.001,
                                                    help="for a request's head, then its body: else 408")] = 30.0,
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs/--no-cuda-graphs",
                                              help="decode steps through CUDA graphs (CUDA only)")] = True,
    prefix_cache: Annotated[bool, typer.Option(
        "--prefix-cache/--no-prefix-cache", envvar="WORKER_ORCD_PREFIX_CACHE",
        help="reuse the KV of cached prompt prefixes (a repeated system prompt, a growing conversation)")] = True,
    nondeterministic: Annotated[bool, typer.Option(
        "--nondeterministic", help="CUDA: the fastest kernel per batch size; a sequence's tokens may then "
                                   "change with what else runs beside it")] = False,
    cpu_kernels: CpuKernelsOpt = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="WORKER_ORCD_API_KEY",
                                                help="Bearer token required on every endpoint but /health and "
                                                     "/ready")] = None,
    served_model_name: Annotated[list[str] | None, typer.Option(
        "--served-model-name", help="a name `model` may take (repeatable; default: the file stem and the "
                                    "GGUF's general.name)")] = None,
    allowed_origins: Annotated[list[str] | None, typer.Option(
        "--allowed-origins", help="CORS origins (repeatable or comma-separated; '*' for any)")] = None,
) -> None:
    """Serve the model over HTTP: the worker API and an OpenAI-compatible API."""
    import asyncio
    import logging

    from worker_orcd.server import ServeConfig, Worker
    from worker_orcd.server import serve as run_server
    from worker_orcd.server.run import bind_socket

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if nondeterministic:  # read when the CUDA kernels are first imported, at load
        os.environ["WORKER_ORCD_NONDETERMINISTIC"] = "1"
    if gpu_device is not None and device in ("auto", "cuda"):
        device = f"cuda:{gpu_device}"
    cfg = ServeConfig(host=host, port=port, worker_id=worker_id, callback_url=callback_url, ctx=ctx,
                      max_batch=max_batch, max_tokens_in=max_tokens_in, max_tokens_out=max_tokens_out,
                      inference_timeout_sec=inference_timeout_sec, kv_cache_size_mb=kv_cache_size_mb,
                      gpu_memory_utilization=gpu_memory_utilization,
                      max_body_bytes=max_body_bytes, read_timeout_sec=read_timeout_sec, cuda_graphs=cuda_graphs,
                      prefix_cache=prefix_cache,
                      api_key=api_key or None, served_model_names=served_model_name or None,
                      allowed_origins=[o.strip() for v in allowed_origins or [] for o in v.split(",") if o.strip()])
    try:
        sock = bind_socket(host, port)
    except OSError as e:
        _fail(e.strerror or str(e))
    _force_cpu_kernels(cpu_kernels)  # after the port: a busy port is the one line printed
    _check_memory(model, device, cfg, _parse_size(vram_limit) if vram_limit is not None else None)
    m = _load(model, device, mmap)
    try:
        worker = Worker(m, cfg)
    except ValueError as e:
        _fail(str(e))

    def on_ready(uri: str) -> None:
        print(f"ready: {worker.model_id} on {m.device} at {uri}", flush=True)
        print(f"curl -N {uri}/v1/chat/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{worker.model_id}\", \"messages\": [{{\"role\": \"user\", "
              f"\"content\": \"Hello!\"}}], \"stream\": true}}'", flush=True)

    try:
        asyncio.run(run_server(worker, on_ready, sock))
    except RuntimeError as e:
        _fail(str(e))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
