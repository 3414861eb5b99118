"""The `cyclej` command. Exit codes: 0 done, 1 a stage failed (name and resume point printed), 2 bad input
(one line naming the file or field, no traceback).

The library's commands (validate, status, plan, translate, eval) run on `cyclej` alone. `run` and
`serve` hand over to the Prefect layer, and they reach it through one door, `prefect_layer()`: the only
place under `cyclej/` that imports `flows/` (tests/test_import_rules.py holds it to that), never at module
level, so importing the library (or running its other commands) loads no Prefect. Why not move `run` into
`flows/`: the console script `cyclej = cyclej.cli:main` is installed in every environment and the tests,
drills, benchmarks and launcher start `python -m cyclej.cli run`; moving it would need a reinstall of the
package and a second entry point, for the same one import.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Annotated, cast

import typer

from cyclej.config import DOMAIN_KEYS, STAGES, DomainKey, PipelineConfig, load_config
from cyclej.errors import BadInput, CyclejError
from cyclej.runtime import quiet

# A process spawned by a quiet run (vLLM's engine core) imports this module as its main one, before vLLM.
quiet.apply_if_inherited()

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="CYCLE_J: train one LM that rewrites domain A as B and back, from unpaired text.",
)

ConfigArg = Annotated[Path | None, typer.Argument(help="pipeline config (YAML)", show_default=False)]
PresetOpt = Annotated[str | None, typer.Option("--preset", help="a shipped preset: tiny, demo, yelp or gptj")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a config value: --set rl.steps=10")]
StorageOpt = Annotated[
    str | None, typer.Option("--storage", help="artifact store: a path, file://… or s3://bucket/prefix")
]
# Read by main() before parsing (cyclej.runtime.quiet);
# declared here so the commands that load models accept it.
VerboseOpt = Annotated[
    bool,
    typer.Option("--verbose", help="also print third-party warnings and notices (torch, transformers, vLLM)"),
]


def _config(
    config: Path | None, preset: str | None, sets: list[str] | None, storage: str | None
) -> PipelineConfig:
    return load_config(config, preset, sets or [], storage)


def _check_inputs(cfg: PipelineConfig, until: str | None = None) -> str:
    """Config, corpora and storage: everything that can be checked before any GPU is rented (for the
    stages up to `until`)."""
    from cyclej.runtime.faults import parse
    from cyclej.runtime.store import ArtifactStore

    parse(os.environ.get("CYCLEJ_FAULT", ""))
    summary = _check_corpora(cfg, context_too=until != "data")
    store = ArtifactStore.from_config(cfg.storage)
    store.check()
    return f"{summary}; storage {store.root_uri} writable"


def _check_corpora(cfg: PipelineConfig, context_too: bool = True) -> str:
    """The model names, resolved as the stages will resolve them but without loading weights, then the
    data stage's own cleaning (`cyclej.stages.data.clean_corpora`): files read, whitespace normalized,
    empty, duplicate, cross-domain and over-long lines (base tokenizer, data.max_tokens) dropped, and every
    refusal the stage would make at run time (too few clean lines, fewer than one batch, same file or same
    lines in both domains). Line lengths need the base model's tokenizer; without it on this machine (a hub
    id only GPU workers resolve) they are left to the data stage and the summary says so."""
    from cyclej.models.catalog import check_model_spec, tokenizer_if_available
    from cyclej.runtime.progress import Progress
    from cyclej.stages.data import clean_corpora

    for role in ("base", "paraphraser", "embedder", "discriminator"):
        check_model_spec(f"models.{role}", getattr(cfg.models, role))
    tokenizer = tokenizer_if_available(cfg.models.base)
    domains = clean_corpora(cfg, tokenizer, Progress(show_bar=False))
    if tokenizer is not None and context_too:
        _check_context_rows(cfg, tokenizer, [d.train for d in domains], [d.dev for d in domains])
    parts = []
    for d in domains:
        raw = sum(len(f.lines) for f in d.train_files + d.dev_files)
        parts.append(
            f"{d.cfg.name} {raw} lines in {len(d.train_files) + len(d.dev_files)} file(s), "
            f"{len(d.train)} train + {len(d.dev)} dev after cleaning"
        )
    if tokenizer is None:
        parts.append(
            f"line lengths not checked here (the tokenizer of {cfg.models.base} is not on this machine)"
        )
    return "; ".join(parts)


def _check_context_rows(
    cfg: PipelineConfig, tokenizer: object, train: list[list[str]], dev: list[list[str]]
) -> None:
    """The `context` stage's own refusal, made here: it packs the clean lines of both domains into rows of
    context.seq_len tokens and needs at least one train row and one dev row. A small corpus (the 2 % held
    out of a few hundred lines) passed every other check and failed only after Prefect had started."""
    from cyclej.stages.context import token_stream

    seq_len = cfg.context.seq_len
    for which, lines in (("train", train), ("dev", dev)):
        if len(token_stream(tokenizer, [line for d in lines for line in d], seed=0)) < seq_len:  # type: ignore[arg-type]
            raise BadInput(
                f"context: the {which} lines of both domains hold fewer tokens than one row of "
                f"context.seq_len={seq_len}; lower context.seq_len or add text"
                + (" (or give dev files)" if which == "dev" else "")
            )


@app.command()
def validate(
    config: ConfigArg = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    storage: StorageOpt = None,
    allow_warnings: Annotated[
        bool,
        typer.Option("--allow-warnings", help="exit 0 even when a stage's settings cannot change the model"),
    ] = False,
) -> None:
    """Check the config, the corpora and the storage; exit 0, or 2 with a one-line reason (a stage whose
    settings cannot change the model is one, unless --allow-warnings)."""
    cfg = _config(config, preset, set_, storage)
    typer.echo(f"ok: {cfg.name}: {_check_inputs(cfg)}")
    from cyclej.training.diagnostics import update_size_warnings

    # A stage whose lr / eps / clipping cannot move the model would spend hours and change nothing
    # (cyclej.training.diagnostics.step_estimates): refused like bad input, because nobody means to run that.
    # The card's own RL settings are such (the gptj preset keeps them), hence the way out.
    warned = update_size_warnings(cfg)
    for warning in warned:
        typer.echo(f"warning: {warning}", err=True)
    if warned and not allow_warnings:
        stages = ", ".join(w.split(":", 1)[0] for w in warned)
        raise BadInput(
            f"{stages}: the settings cannot change the model (warning above); fix them or pass "
            "--allow-warnings"
        )


INIT_PRESETS = ("demo", "yelp", "gptj", "tiny")


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="the config file to write, e.g. my.yaml", show_default=False)],
    from_: Annotated[
        str, typer.Option("--from", help=f"the preset to start from: {', '.join(INIT_PRESETS)}")
    ] = "demo",
    a: Annotated[
        str | None, typer.Option("--a", help="domain A's text: a file or folder (default: data/a/)")
    ] = None,
    b: Annotated[
        str | None, typer.Option("--b", help="domain B's text: a file or folder (default: data/b/)")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing file")] = False,
) -> None:
    """Write a commented config for your own two corpora that inherits a preset (`base:`); edit it, then
    `cyclej validate` and `cyclej run` it."""
    from cyclej.config import load_config

    if from_ not in INIT_PRESETS:
        raise BadInput(f"--from {from_}: unknown preset (one of {', '.join(INIT_PRESETS)})")
    if path.exists() and not force:
        raise BadInput(f"{path}: already exists (pass --force to overwrite it)")
    preset = load_config(preset=from_)
    text = init_config_text(path.stem, from_, preset, a or "data/a/", b or "data/b/")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise BadInput(f"{path}: cannot write ({exc.strerror})") from None
    typer.echo(f"wrote {path} (base: {from_}); edit its domains, then: cyclej validate {path}")


def init_config_text(name: str, preset_name: str, preset: PipelineConfig, a: str, b: str) -> str:
    """The file `cyclej init` writes: what a user edits (the domains, their markers, the storage), each
    with a comment saying what it is; every other setting comes from the preset through `base:`."""
    import json

    def flow(value: object) -> str:  # a string or a list of strings: JSON is YAML, and always quoted
        return json.dumps(value, ensure_ascii=False)

    def domain(key: str, letter: str, train: str) -> str:
        d = getattr(preset, key)
        folder = Path(train.rstrip("/")).stem or letter.lower()
        return (
            f"{key}:\n"
            f"  name: {flow(folder)}  # in reports and in the model card\n"
            f"  marker: {flow(d.marker)}  # a new special token that asks for this domain's style\n"
            f"  train: {flow([train])}  # files or folders: .txt (a text a line), .jsonl/.csv (text_field), "
            ".parquet\n"
            "  # dev: [held-out.txt]  # held-out lines; without them the data stage holds out a slice of "
            "train\n"
        )

    return (
        f"# {name}: CYCLE_J on your own two corpora, starting from the `{preset_name}` preset.\n"
        "# Edit the domains and the storage below; every other setting is the preset's (`base: "
        f"{preset_name}`,\n"
        "# cyclej/presets/ and docs/recipe-options.md): add a section to change one, e.g. `rl: {steps: "
        "20}`.\n"
        "# Relative paths are relative to this file's folder. Check with `cyclej validate`, run with "
        "`cyclej run`.\n"
        f"base: {preset_name}\n"
        f"name: {flow(name)}  # names the runs (`<name>-<fingerprint>`)\n"
        "storage:\n"
        f"  root: {flow(preset.storage.root)}  # a folder, file://… or s3://bucket/prefix (credentials: "
        "AWS_* variables)\n"
        + domain("domain_a", "A", a)
        + domain("domain_b", "B", b)
        + f"# Lines longer than data.max_tokens ({preset.data.max_tokens} tokens of the base model) "
        "are dropped:\n"
        f"# data: {{max_tokens: {preset.data.max_tokens}}}\n"
    )


@app.command()
def run(
    config: ConfigArg = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    storage: StorageOpt = None,
    until: Annotated[str | None, typer.Option(help=f"stop after this stage ({', '.join(STAGES)})")] = None,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            help="also print third-party warnings and notices "
            "(torch, transformers, vLLM) and Prefect's tracebacks of expected "
            "failures (bad input, a store gone); they are in the run's UI log",
        ),
    ] = False,
) -> None:
    """Run the whole pipeline as a Prefect flow run; finished stages come back cached."""
    cfg = _config(config, preset, set_, storage)
    if until is not None and until not in STAGES:
        raise BadInput(f"--until {until}: unknown stage (one of {', '.join(STAGES)})")
    # Two processes (flows/launch.py): this launcher checks the inputs, creates the flow run and supervises
    # the run process (the same command, with the run's id in the environment) that executes it.
    launcher = prefect_layer()
    flow_run_id = os.environ.get(launcher.FLOW_RUN_ENV)
    if flow_run_id is None:
        typer.echo(f"cyclej: {cfg.name}: {_check_inputs(cfg, until)}", err=True)
        raise SystemExit(launcher.launch(cfg, until, sys.argv[1:]))
    refs = launcher.execute(cfg, until, flow_run_id, verbose=verbose)
    for name, ref in refs.items():
        typer.echo(f"{name:13s} {ref['fingerprint']}  {ref['uri']}", err=True)
    if "eval" in refs:
        from cyclej.runtime.store import ArtifactRef, ArtifactStore

        store = ArtifactStore.from_config(cfg.storage)
        typer.echo(store.read_text(ArtifactRef(**refs["eval"]), "report.md"))


@app.command()
def status(
    config: ConfigArg = None, preset: PresetOpt = None, set_: SetOpt = None, storage: StorageOpt = None
) -> None:
    """Each stage: fingerprint, complete / partial (last checkpoint) / missing, artifact URI."""
    from cyclej.pipeline.registry import plan_pipeline
    from cyclej.runtime.store import ArtifactStore

    cfg = _config(config, preset, set_, storage)
    store = ArtifactStore.from_config(cfg.storage)
    store.check()
    for name, stage in plan_pipeline(cfg).items():
        fp = stage.fingerprint
        if store.exists(name, fp):
            state = "complete"
        else:
            resume = stage.resume_point(store)
            state = f"partial ({resume})" if resume else "missing"
        typer.echo(f"{name:13s} {fp}  {state:24s} {store.uri(name, fp)}")


@app.command()
def translate(
    # Not required by typer, so that `cyclej translate` alone names the model first (checked below).
    to: Annotated[str | None, typer.Option("--to", help="target domain: a or b")] = None,
    file: Annotated[str, typer.Argument(help="input lines; - for stdin")] = "-",
    model: Annotated[
        str | None, typer.Option("--model", help="model directory or artifact URI (s3://… too)")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="instead of --model: the final (rl) model of this config's run, from its storage"
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="lines per generation batch")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="longest output in tokens")] = 64,
    backend: Annotated[
        str,
        typer.Option(help="auto (vLLM when installed and the input is large enough), vllm or transformers"),
    ] = "auto",
    verbose: VerboseOpt = False,
) -> None:
    """Rewrite lines into domain a or b, one output line per input line."""
    from cyclej.generation.translate import local_model_dir, translate_lines
    from cyclej.models.catalog import check_model_spec

    if (model is None) == (config is None):
        raise BadInput("give --model DIR_OR_URI or --config CONFIG (one of them)")
    if to is None:
        raise BadInput("missing option --to (a or b)")
    if to not in DOMAIN_KEYS:
        raise BadInput(f"--to {to}: must be a or b")
    if backend not in ("auto", "vllm", "transformers"):
        raise BadInput(f"--backend {backend}: must be auto, vllm or transformers")
    if file == "-":
        lines = sys.stdin.read().splitlines()
    else:
        p = Path(file)
        if not p.is_file():
            raise BadInput(f"{file}: no such file")
        lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
    model_dir = local_model_dir(model if model is not None else _final_model(config))  # type: ignore[arg-type]
    check_model_spec(
        "--model", str(model_dir)
    )  # a config.json that is not JSON: one line, before any backend
    out = translate_lines(
        str(model_dir),
        lines,
        cast(DomainKey, to),  # checked above (typer has no Literal options)
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        backend=backend,  # type: ignore[arg-type]
    )
    for line in out:
        typer.echo(line)


def _final_model(config: Path) -> str:
    """The URI of the model a finished `cyclej run CONFIG` made: the rl stage's artifact for the config's
    fingerprints, so a user never copies a fingerprint by hand."""
    from cyclej.pipeline.registry import fingerprints
    from cyclej.runtime.store import ArtifactStore

    cfg = _config(config, None, None, None)
    fp = fingerprints(cfg)["rl"]
    store = ArtifactStore.from_config(cfg.storage)
    if not store.exists("rl", fp):
        raise BadInput(
            f"{config}: no finished model in {store.root_uri} (rl {fp}); run `cyclej run {config}` "
            "first (`cyclej status` shows how far it got)"
        )
    return f"{store.uri('rl', fp)}/model"


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Option("--model", help="model directory or artifact URI")],
    config: ConfigArg = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    storage: StorageOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """The evaluation report for any model directory (beside the copy-the-input baseline)."""
    from cyclej.generation.translate import local_model_dir
    from cyclej.runtime.store import ArtifactStore
    from cyclej.stages.eval import evaluate_model_dir

    cfg = _config(config, preset, set_, storage)
    store = ArtifactStore.from_config(cfg.storage)
    store.check()
    report = evaluate_model_dir(local_model_dir(model), cfg, store)
    typer.echo(report.markdown)


@app.command()
def plan(config: ConfigArg = None, preset: PresetOpt = None, set_: SetOpt = None) -> None:
    """Per-stage fingerprint, GPU memory, the smallest RunPod GPU that fits, and its hourly cost."""
    from cyclej.pipeline.registry import fingerprints
    from cyclej.pipeline.sizing import format_plan
    from cyclej.pipeline.sizing import plan as make_plan

    cfg = _config(config, preset, set_, None)
    typer.echo(format_plan(make_plan(cfg), fingerprints=fingerprints(cfg)))


@app.command()
def serve() -> None:
    """Execute retries of `cyclej run` runs (the UI's Retry, `prefect flow-run retry`); runs until stopped."""
    prefect_layer().serve()


def prefect_layer() -> ModuleType:
    """flows/launch.py, the Prefect layer's launcher: the one import of the wrapper layer in the library
    (see the module docstring). Imported when `run` or `serve` needs it, so nothing else loads Prefect."""
    import flows.launch

    return flows.launch


SIGTERM_GRACE_SECONDS = 10.0  # after a SIGTERM, how long a running stage may take to stop on its own
_wakeup_sockets: tuple[socket.socket, socket.socket] | None = None  # kept alive for the process


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _stop_children_and_exit(code: int) -> None:
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        child.terminate()
    _, alive = psutil.wait_procs(children, timeout=5)
    for child in alive:
        child.kill()
    os._exit(code)


def _watch_for_sigterm() -> None:
    """A stage runs in Prefect's worker thread, and Prefect waits for it before acting on a SIGTERM, so a
    long stage (or a stuck one) would keep the process, and Prefect's temporary server, alive until a
    SIGKILL orphans the server. The interpreter writes every handled signal's number to the wakeup fd,
    whichever handler is installed (Prefect swaps in its own during a flow run); this thread reads it and,
    if the process has not ended `grace` s after a SIGTERM, stops our child processes and exits 143.
    The stage resumes from its newest checkpoint on the next run."""
    global _wakeup_sockets
    grace = float(os.environ.get("CYCLEJ_SIGTERM_GRACE", SIGTERM_GRACE_SECONDS))
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    try:
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except ValueError:  # not the main thread (cyclej embedded in another program): nothing to watch
        reader.close()
        writer.close()
        return
    _wakeup_sockets = (reader, writer)

    def watch() -> None:
        while signal.SIGTERM not in reader.recv(64):
            pass
        time.sleep(grace)
        _stop_children_and_exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="cyclej-sigterm-watchdog").start()


def main() -> None:
    """Entry point: map CYCLE_J errors to exit codes with a one-line message."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Before any command imports torch, transformers or vLLM: their notices are noise to a user
    # (cyclej.runtime.quiet).
    quiet.configure(verbose=quiet.wants_verbose(sys.argv[1:]))
    # SIGTERM (a pod being stopped, `kill`) ends through Python's exit path, so the atexit hook of
    # Prefect's temporary server (our child process) stops it; under the default handler the process
    # died at once and left the server running. Prefect's flow engine marks the run Crashed first, then
    # hands the signal on to this handler. The watchdog covers a stage that does not stop in time.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    _watch_for_sigterm()
    try:
        app(standalone_mode=False)
    except CyclejError as exc:
        typer.echo(f"cyclej: error: {exc}", err=True)
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        raise SystemExit(130) from None
    except Exception as exc:  # command-line usage errors
        code = _usage_error_exit(exc)
        if code is None:
            raise
        raise SystemExit(code) from None


def _usage_error_exit(exc: Exception) -> int | None:
    """The exit code for a command-line parsing error (after printing it on one line), or None for
    anything else. Typer raises the classes of the click it vendors (`typer._click.exceptions`), which
    are not click's: both are matched, and every one of them is bad input (exit 2)."""
    import click

    if isinstance(exc, typer.Exit | click.exceptions.Exit):
        return int(exc.exit_code)
    vendored: tuple[type[BaseException], ...] = ()
    try:
        from typer._click import exceptions as typer_click

        vendored = (typer_click.ClickException,)
        if isinstance(exc, typer_click.NoArgsIsHelpError):  # `cyclej` alone: the help, as click shows it
            typer.echo(exc.format_message())
            return 2
    except ImportError:  # a typer that uses click itself
        pass
    if isinstance(exc, vendored + (click.exceptions.ClickException,)):
        message = " ".join(str(exc.format_message()).split())  # type: ignore[attr-defined]
        typer.echo(f"cyclej: error: {message} (see cyclej --help)", err=True)
        return 2
    return None


if __name__ == "__main__":
    main()
