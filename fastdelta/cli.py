"""The `fastdelta` command (also `python -m fastdelta`).

    fastdelta doctor [--json PATH] [--no-bench] [--bench-seconds 60] [--max-seconds 900]
    fastdelta build-ext
    fastdelta inspect MODEL_DIR_OR_CONFIG [--delta lora --modified-modules q_proj v_proj]
    fastdelta bench [--quick] [--device cuda] [-- PYTEST_ARGS ...]

`doctor` checks this machine: devices, versions, backends, the kernels on each GPU, a short
benchmark (see fastdelta.doctor); run it first on a GPU, and paste its JSON into a bug report.
`build-ext` builds the C++ extension of the cpp backend into the cache directory, so that no
first forward waits for it. `inspect` prints a model's structure graph from its config alone:
the model is built on the meta device, so no weights are read or downloaded and a 70B config
takes no memory. `bench` runs the benchmark suite of a fastdelta repository (its `benchmarks/`
folder, which an installed wheel does not hold) and writes the report to `benchmarks/results/`.

The arguments are parsed before torch, transformers or the delta models are imported (each
command imports what it needs), so `--help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

GRIDS = ("smoke", "quick", "full")
STATISTICS = ("min", "median", "mean")
# The delta types `inspect --delta` takes: fastdelta.delta_models.auto.DELTA_MODELS's keys,
# named here so that parsing imports no delta model (a test checks that they agree).
DELTA_TYPES = (
    "adapter",
    "bitfit",
    "compacter",
    "lora",
    "low_rank_adapter",
    "parallel_adapter",
    "prefix",
    "soft_prompt",
)


class CommandError(Exception):
    """A user error: printed as `fastdelta <command>: error: <message>`, exit status 2."""


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a benchmark run, shared by `fastdelta bench` and `benchmarks.run`."""
    parser.add_argument(
        "--grid",
        choices=GRIDS,
        default="full",
        help="shapes to run: full (the default, made for a GPU; hours on a CPU), quick (a few "
        "minutes on a CPU) or smoke (minuscule shapes that prove the suite runs)",
    )
    parser.add_argument(
        "--quick", action="store_const", dest="grid", const="quick", help="same as --grid quick"
    )
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--dtypes",
        help="comma-separated dtypes of the op benchmarks (default: bfloat16,float32 on CUDA, "
        "float32 on the CPU)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        help="where the report goes (default: the repository's benchmarks/results)",
    )
    parser.add_argument(
        "--statistic",
        choices=STATISTICS,
        default="min",
        help="which statistic of each benchmark's rounds the report compares (default: min, "
        "the one least disturbed by other work on the machine)",
    )
    parser.add_argument(
        "pytest_args",
        nargs="*",
        metavar="-- PYTEST_ARGS",
        help="after `--`: more pytest arguments, e.g. -- -k lora --benchmark-max-time=2",
    )


def repository_root(repository: Path | None) -> Path:
    """The fastdelta checkout whose benchmarks/ to run: `repository`, or the folder that holds
    the imported fastdelta package."""
    import fastdelta

    root = repository or Path(fastdelta.__file__).resolve().parent.parent
    if not (root / "benchmarks" / "run.py").is_file():
        where = f"in {root}" if repository else f"next to the installed package (in {root})"
        raise CommandError(
            f"found no benchmarks/ folder of a fastdelta repository {where}. The benchmark "
            "suite is not part of an installed wheel: clone the fastdelta repository and run "
            "`fastdelta bench --repository PATH_TO_CLONE` (or `pip install -e .` there)."
        )
    return root


def run_bench(arguments: argparse.Namespace) -> int:
    """Run `python -m benchmarks.run` in the repository with the same options."""
    root = repository_root(arguments.repository)
    command = [sys.executable, "-m", "benchmarks.run", f"--grid={arguments.grid}"]
    command += [f"--statistic={arguments.statistic}"]
    if arguments.device:
        command.append(f"--device={arguments.device}")
    if arguments.dtypes:
        command.append(f"--dtypes={arguments.dtypes}")
    if arguments.output_dir:
        command.append(f"--output-dir={arguments.output_dir.resolve()}")
    if arguments.pytest_args:
        command += ["--", *arguments.pytest_args]
    return subprocess.run(command, cwd=root, check=False).returncode


def load_config(location: str):
    """The transformers config at `location`: a local directory holding config.json, or the
    path of a config file. Nothing is downloaded."""
    import transformers

    path = Path(location)
    if not path.exists():
        raise CommandError(
            f"{location!r} is not a local directory or file. fastdelta inspect reads local "
            "files only and downloads nothing: for a model on the Hugging Face Hub, fetch its "
            f"config first (`hf download {location} config.json --local-dir DIR`) and pass DIR."
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CommandError(
                f"{path} holds no config.json; pass the folder a transformers model was saved "
                "to (save_pretrained), or the path of its config file"
            )
        path = path / "config.json"
    try:
        values = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CommandError(f"{path} is not a JSON config file: {error}") from error
    if not isinstance(values, dict) or "model_type" not in values:
        raise CommandError(
            f"{path} has no 'model_type', so transformers cannot tell which model it "
            "configures; pass a config.json written by save_pretrained"
        )
    model_type = values.pop("model_type")
    try:
        return transformers.AutoConfig.for_model(model_type, **values)
    except _config_errors() as error:  # a field of the wrong type or value, named by the error
        reason = " ".join(str(error).split())
        raise CommandError(f"transformers cannot read {path}: {reason}") from error


def _config_errors() -> tuple[type[Exception], ...]:
    """What building a transformers config raises for a bad field: ValueError and TypeError,
    and the validation errors of huggingface_hub's strict dataclasses (transformers 5)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub, whose configs raise the builtin errors
        return (ValueError, TypeError)
    return (ValueError, TypeError, StrictDataclassError)


def build_model(config, device: str):
    """The model `config` describes, with uninitialised weights on `device`: the class its
    `architectures` names when transformers has it (heads included), else AutoModel's."""
    import torch
    import transformers

    names = getattr(config, "architectures", None) or []
    model_class = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    with torch.device(device):
        if model_class is None:
            return transformers.AutoModel.from_config(config)
        return model_class(config)


# Config fields that are sizes or counts in transformers configs: never negative (no default
# config of any transformers model has one below zero).
SIZE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "embedding_size",
    "d_model",
    "d_ff",
    "d_kv",
    "num_layers",
    "num_decoder_layers",
    "num_heads",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "n_positions",
    "dim",
    "hidden_dim",
    "n_layers",
    "n_heads",
    "ffn_dim",
    "word_embed_proj_dim",
    "encoder_layers",
    "decoder_layers",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
)


def build_checked_model(config, location: str, device: str):
    """`build_model`, with an invalid config reported as one line that names what is wrong."""
    aliases = getattr(config, "attribute_map", {})  # GPT-2's hidden_size is its n_embd
    negative = [
        f"{field}={getattr(config, field)}"
        for field in SIZE_FIELDS
        if field not in aliases
        and isinstance(getattr(config, field, None), int)
        and getattr(config, field) < 0
    ]
    if negative:
        verb = "is" if len(negative) == 1 else "are"
        raise CommandError(
            f"{location}: {', '.join(negative)} {verb} negative; sizes and counts must be positive"
        )
    try:
        return build_model(config, device)
    except (ValueError, RuntimeError, TypeError, IndexError, ZeroDivisionError) as error:
        raise CommandError(
            f"transformers cannot build a {config.model_type} model from {location}: {error}"
        ) from error


def run_inspect(arguments: argparse.Namespace) -> int:
    """Print the structure graph of the configured model, with a delta attached if asked."""
    if arguments.modified_modules and not arguments.delta:
        raise CommandError("--modified-modules names the targets of a delta: add --delta TYPE")
    import fastdelta

    config = load_config(arguments.model)
    model = build_checked_model(config, arguments.model, arguments.device)
    if arguments.delta:
        delta_config = {"delta_type": arguments.delta}
        if arguments.modified_modules:
            delta_config["modified_modules"] = arguments.modified_modules
        try:
            delta_model = fastdelta.AutoDeltaModel.from_config(
                fastdelta.AutoDeltaConfig.from_dict(delta_config), backbone_model=model
            )
        except (ValueError, TypeError, RuntimeError, NotImplementedError) as error:
            hint = ""
            if arguments.device == "meta" and "meta" in str(error).lower():
                # Only for errors the meta device caused: a misspelled module name is not one.
                hint = " (the model is on the meta device: --device cpu builds real weights)"
            raise CommandError(
                f"cannot attach the {arguments.delta} delta: {error}{hint}"
            ) from error
        delta_model.freeze_module()
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__} from {arguments.model}: {parameters:,} parameters")
    fastdelta.Visualization(model).structure_graph(
        common_structure=arguments.common_structure,
        expand_params=arguments.expand_params,
        keep_non_params=arguments.keep_non_params,
    )
    return 0


def run_doctor(arguments: argparse.Namespace) -> int:
    """Print the doctor's report (and write its JSON); 1 when a check failed."""
    from fastdelta import doctor

    if arguments.bench_seconds <= 0 or arguments.max_seconds <= 0:
        raise CommandError("--bench-seconds and --max-seconds take a positive number of seconds")
    report = doctor.collect(
        benchmark=arguments.bench,
        bench_seconds=arguments.bench_seconds,
        max_seconds=arguments.max_seconds,
        progress=doctor.progress_to_stderr,
    )
    print(doctor.render(report))
    if arguments.json:
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        arguments.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nThe report is in {arguments.json}; paste it into a bug report.")
    return 1 if report["summary"]["failed"] else 0


def run_build_ext(arguments: argparse.Namespace) -> int:
    """Build (or find) the C++ extension; 1 with the reason when it cannot be built."""
    from fastdelta.ops import _extension

    settings = _extension.build_settings()
    print(f"fastdelta build-ext: building fastdelta's C++ extension ({settings.key}) if needed")
    reason = _extension.unavailable_reason()
    if reason:
        print(f"fastdelta build-ext: error: {reason}", file=sys.stderr)
        return 1
    library = _extension.built_library(settings)
    kernels = "CPU and CUDA kernels" if settings.with_cuda else "CPU kernels only"
    print(f"fastdelta build-ext: built, with {kernels}: {library}")
    if settings.no_cuda_reason:
        print(f"fastdelta build-ext: no CUDA kernels because {settings.no_cuda_reason}")
    return 0


def parser() -> argparse.ArgumentParser:
    """The argument parser of the `fastdelta` command."""
    main_parser = argparse.ArgumentParser(
        prog="fastdelta",
        description="fastdelta's command line: check the machine, build the C++ extension, "
        "inspect models, benchmark.",
    )
    commands = main_parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    doctor = commands.add_parser(
        "doctor",
        help="check this machine: devices, backends, the kernels on each GPU, a short benchmark",
        description="List the devices, versions and backends (and why a backend cannot run), "
        "check every kernel variant of a representative set against the reference on each "
        "CUDA GPU (and on the CPU under TRITON_INTERPRET=1), run the public ops against the "
        "reference, and time headline shapes against the floor and PEFT. Exit status 1 when "
        "a check failed.",
    )
    doctor.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    doctor.add_argument("--no-bench", dest="bench", action="store_false", help="skip the benchmark")
    doctor.add_argument(
        "--bench-seconds",
        type=float,
        default=60.0,
        help="time the benchmark takes, about (default: 60)",
    )
    doctor.add_argument(
        "--max-seconds",
        type=float,
        default=900.0,
        help="stop starting kernel checks after this long; the rest are reported as skipped "
        "(default: 900)",
    )
    commands.add_parser(
        "build-ext",
        help="build the C++ extension of the cpp backend now (a minute or two, once)",
        description="Build fastdelta's C++/CUDA extension into the cache directory "
        "($FASTDELTA_CACHE/ext, by default ~/.cache/fastdelta/ext), where every later process "
        "finds it. Needs a C++ compiler and ninja (and nvcc for the CUDA kernels).",
    )
    inspect = commands.add_parser(
        "inspect",
        help="print a model's structure graph from its config (no weights)",
        description="Print the structure graph of a transformers model built from its config "
        "on the meta device: no weights are read, nothing is downloaded.",
    )
    inspect.add_argument("model", help="a local model directory holding config.json, or the file")
    inspect.add_argument("--delta", choices=DELTA_TYPES, help="attach this delta type first")
    inspect.add_argument(
        "--modified-modules",
        nargs="+",
        metavar="NAME",
        help="the delta's targets (default: its own)",
    )
    inspect.add_argument("--common-structure", action="store_true", help="show attn@, ff@ names")
    inspect.add_argument("--expand-params", action="store_true", help="a line per parameter")
    inspect.add_argument(
        "--keep-non-params", action="store_true", help="show parameterless modules"
    )
    inspect.add_argument(
        "--device",
        default="meta",
        help="build the model here instead of the meta device (needs the model's memory)",
    )
    bench = commands.add_parser(
        "bench",
        help="run the benchmark suite of a fastdelta repository",
        description="Run the benchmark suite in a fastdelta repository's benchmarks/ folder and "
        "write <device>.json, .md and .png to benchmarks/results/.",
    )
    add_bench_arguments(bench)
    bench.add_argument(
        "--repository",
        type=Path,
        help="the fastdelta checkout to run (default: the one the package is imported from)",
    )
    return main_parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fastdelta` console command; returns the exit status."""
    arguments = parser().parse_args(argv)
    commands = {
        "doctor": run_doctor,
        "build-ext": run_build_ext,
        "inspect": run_inspect,
        "bench": run_bench,
    }
    run = commands[arguments.command]
    try:
        return run(arguments)
    except CommandError as error:
        print(f"fastdelta {arguments.command}: error: {error}", file=sys.stderr)
        return 2
