"""``python -m fusion``: merge a tuned model toward its base, or inspect where they differ.

    python -m fusion merge --tuned T --base B --method M [--set NAME=VALUE ...] --out DIR
                           [--device auto|cpu|cuda] [--seed N]
                           [--push-to-hub OWNER/NAME [--private]]
    python -m fusion push DIR --repo OWNER/NAME [--private]
    python -m fusion export-lm --model M [--base B] --out DIR
    python -m fusion inspect --tuned T --base B [--set NAME=VALUE ...] [--json FILE]
    python -m fusion methods

Installed as a package (``pip install .``), the same command is ``neuron-fusion``. This
interface is stable: scripts outside the project call it. Errors in the input print one
line naming the file, tensor or value at fault and exit with status 2. Parsing and ``methods``
do not import torch (only the registry's data), so they answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import FusionError
from .output import json_text, os_error_line, writable_directory, write_whole
from .registry import ALIASES, METHOD_NAMES, METHODS, resolve, schema

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'4GB', '500MB', '1.5G', '123' -> bytes (powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4GB, 500MB)")
    return int(float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2).upper() or "_"))


def parse_sets(items: Sequence[str]) -> dict[str, str]:
    values = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise FusionError(f"--set expects NAME=VALUE, got {item!r}")
        values[name.strip()] = value.strip()
    return values


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tuned", required=True, help="tuned model (LLaVA-style MLLM or fine-tuned LLM): directory or hub repo id")
    p.add_argument("--base", required=True, help="the base LLM it was tuned from: directory or hub repo id")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE", help="a method parameter (repeatable)")
    p.add_argument(
        "--no-pickle",
        dest="allow_pickle",
        action="store_false",
        help="refuse pickle .bin weights (by default they are read with torch.load(weights_only=True), tensors only)",
    )
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="go on when a merged tensor holds NaN or infinite values (by default that is an error naming the tensor)",
    )


def build_parser(prog: str = "neuron-fusion") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="merge a tuned model toward its base LLM and write a checkpoint")
    _common(merge)
    merge.add_argument("--method", required=True, choices=METHOD_NAMES, metavar="METHOD", help=f"one of: {', '.join(METHOD_NAMES)}")
    merge.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    merge.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to compute (default: cuda if available)")
    merge.add_argument("--seed", type=int, default=0, help="seed of the random methods (dare, della)")
    merge.add_argument("--shard-size", type=parse_size, default="4GB", help="largest output shard (default 4GB)")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    _hub_options(merge, "--push-to-hub", required=False, help="then upload the output to this Hub model repository (created if needed) as one commit")

    export = sub.add_parser("export-lm", help="the language model of a tuned or fused MLLM as a plain causal-LM checkpoint of its base's architecture")
    export.add_argument("--model", required=True, help="the tuned or fused MLLM: directory or hub repo id")
    export.add_argument("--base", help="its base LLM (config and tokenizer); default: the one a fused model's recipe names")
    export.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    export.add_argument("--shard-size", type=parse_size, default="4GB", help="largest output shard (default 4GB)")
    export.add_argument("--no-pickle", dest="allow_pickle", action="store_false", help="refuse pickle .bin weights")

    push = sub.add_parser("push", help="upload a finished merge output to the Hugging Face Hub as one commit")
    push.add_argument("out", help="the merge's output directory")
    _hub_options(push, "--repo", required=True, help="the Hub model repository (owner/name), created if needed")

    inspect = sub.add_parser("inspect", help="print the neuron-change statistics of a tuned/base pair")
    _common(inspect)
    inspect.add_argument("--json", dest="json_out", help="also write the full report (with score curves) to this file")
    inspect.add_argument("--plot", help="also draw the sorted change scores (log-log) to this PNG")

    sub.add_parser("methods", help="list the merge methods and their parameters")

    bench = sub.add_parser("eval", help="the behaviour bench: language/visual accuracy, hallucination and Not-Known rates")
    bench.add_argument("--preset", required=True, help="model pair and probe set (e.g. pocket, llava-1.5-7b)")
    bench.add_argument(
        "--methods", default="task_arithmetic,ties,breadcrumbs,dare,della,neuron_fusion", help="comma-separated methods, each at its defaults"
    )
    bench.add_argument("--out", required=True, help="directory for results.json, results.md, results.png, replies.jsonl")
    bench.add_argument("--sweep", action="store_true", help="sweep each method's strength knob and plot the language-vs-visual trade-off")
    bench.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--limit", type=int, help="ask N text and N image probes, drawn across the skills (a quick look)")
    harness = sub.add_parser("benchmark", help="standard benchmarks through lm-evaluation-harness for the base, the tuned model and fused variants")
    harness.add_argument("--preset", required=True, help="model pair (e.g. llava-1.5-7b, pocket)")
    harness.add_argument("--methods", default="neu-p-taska", help="fused variants, as eval's --methods ('neu-p-taska,ties:density=0.5')")
    harness.add_argument("--suite", default="paper", help="a suite name (paper) or a suite JSON file of your own")
    harness.add_argument("--tasks", help="comma-separated language tasks, instead of the suite's")
    harness.add_argument("--out", required=True, help="directory for results.json, results.md, results.png, the models and each harness's raw output")
    harness.add_argument("--limit", type=int, help="at most N examples per task (a quick look; not comparable with published scores)")
    harness.add_argument("--device", default="cpu", help="lm-eval's device: cpu, cuda, cuda:0")
    harness.add_argument("--batch-size", default="auto", help="lm-eval's batch size (a number, or auto)")
    harness.add_argument("--launcher", default="python", choices=("python", "accelerate"), help="accelerate: data-parallel over every GPU of the machine")
    harness.add_argument("--backend", default="hf", choices=("hf", "vllm"), help="lm-eval's model backend (vllm where it is installed)")
    harness.add_argument("--lmms-python", help="the python of an environment with lmms-eval, for the visual tasks (default: this one)")
    return parser


def _hub_options(p: argparse.ArgumentParser, flag: str, *, required: bool, help: str) -> None:
    p.add_argument(flag, dest="repo", required=required, metavar="OWNER/NAME", help=f"{help}; the token from HF_TOKEN or `hf auth login`, the Hub from HF_ENDPOINT")
    p.add_argument("--private", action="store_true", help="create the repository private (an existing one keeps its visibility)")


def _push(out: Path, args: argparse.Namespace) -> None:
    from .hub import push

    print(f"{args.repo}: pushed as one commit, {push(out, args.repo, private=args.private)}")


def run_export(args: argparse.Namespace) -> int:
    from .export import export_language_model

    result = export_language_model(args.model, args.out, base_ref=args.base, shard_bytes=args.shard_size, allow_pickle=args.allow_pickle)
    what = "already there (same model)" if result.reused else f"written in {result.seconds:.2f} s"
    print(f"{result.path}: {what}; the language model of {result.record['model']} as {result.record['base']}'s architecture")
    return 0


def run_push(args: argparse.Namespace) -> int:
    _push(Path(args.out), args)
    return 0


def run_benchmark(args: argparse.Namespace) -> int:
    from .benchmark import Suite, load_suite
    from .benchmark import run_benchmark as bench
    from .evaluate import parse_methods
    from .presets import get_preset

    if args.limit is not None and args.limit < 1:
        raise FusionError(f"--limit must be at least 1, got {args.limit}")
    suite = load_suite(args.suite)
    if args.tasks:
        suite = Suite(tuple(t.strip() for t in args.tasks.split(",") if t.strip()), suite.visual, suite.include)
    out = Path(args.out)
    writable_directory(out)
    options = {"limit": args.limit, "device": args.device, "batch_size": args.batch_size, "launcher": args.launcher, "backend": args.backend, "lmms_python": args.lmms_python}
    rows = bench(get_preset(args.preset), parse_methods(args.methods), out, suite, **options, log=lambda line: print(line, file=sys.stderr))
    print((out / "results.md").read_text(), end="")
    print(f"written to {out / 'results.json'}, results.md, results.png ({len(rows)} models; raw harness output under {out / 'raw'})")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .merge import fuse

    recipe = resolve(args.method, parse_sets(args.sets), args.seed)
    if args.private and not args.repo:
        raise FusionError("--private makes the repository --push-to-hub creates private: name one with --push-to-hub OWNER/NAME")
    if args.repo:
        from .hub import check_repo_name

        check_repo_name(args.repo)  # before the minutes of merging

    bar = None  # created on the first report, so errors found while checking the inputs come alone

    def progress(p: Any) -> None:
        nonlocal bar
        if args.quiet:
            return
        if bar is None:
            bar = tqdm(total=p.total, unit="B", unit_scale=True, unit_divisor=1024, desc="merging", file=sys.stderr)
        bar.set_postfix_str(p.tensor.rsplit(".", 2)[0][-40:] if p.tensor else p.stage, refresh=False)
        bar.update(p.done - bar.n)

    try:
        result = fuse(
            args.tuned,
            args.base,
            recipe,
            out=args.out,
            device=args.device,
            shard_bytes=args.shard_size,
            allow_pickle=args.allow_pickle,
            progress=progress,
            allow_nonfinite=args.allow_nonfinite,
        )
    finally:
        if bar is not None:
            bar.close()
    what = "already there (same inputs and recipe)" if result.reused else f"written in {result.seconds:.2f} s"
    print(f"{result.path}: {what}; recipe {json.dumps({k: result.recipe[k] for k in ('method', 'params', 'seed')})}")
    if args.repo:  # only after the merge is whole: a failed merge raised above, and pushes nothing
        _push(result.path, args)
    return 0


def check_plot_file(path: str) -> None:
    """A ``--plot`` file name matplotlib can write, checked before the minutes of work that
    come before the plot."""
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    if suffix not in formats:
        raise FusionError(f"--plot {path}: the name must end in one of {', '.join('.' + f for f in sorted(formats))} (the format is taken from it)")


def run_inspect(args: argparse.Namespace) -> int:
    from .merge import inspect_pair

    if args.plot:
        check_plot_file(args.plot)
    report = inspect_pair(
        args.tuned, args.base, resolve("neuron_fusion", parse_sets(args.sets)), allow_pickle=args.allow_pickle, allow_nonfinite=args.allow_nonfinite
    )
    print(f"{'layer':>5}  {'kind':<22} {'neurons':>8} {'located':>8} {'median':>10} {'p90':>10} {'p99':>10} {'max':>10}")
    for row in report["kinds"]:
        q = row["quantiles"]
        layer = "-" if row["layer"] is None else row["layer"]
        print(
            f"{layer:>5}  {row['kind']:<22} {row['neurons']:>8} {row['located']:>8} "
            f"{q['0.5']:>10.3g} {q['0.9']:>10.3g} {q['0.99']:>10.3g} {q['1.0']:>10.3g}"
        )
    s = report["summary"]
    print(
        f"\n{s['located']} of {s['neurons']} neurons located (top_ratio {report['params']['top_ratio']}); "
        f"they hold {100 * s['located_share']:.1f}% of the total squared change, "
        f"{100 * s['located_share_in_layers']:.1f}% of the squared change inside the decoder layers"
    )
    if args.json_out:
        write_whole(Path(args.json_out), json_text(report))
    if args.plot:
        from .plots import curve_figure, save_figure

        save_figure(curve_figure(report["kinds"], report["params"]["top_ratio"]), args.plot)
    return 0


def run_methods(_: argparse.Namespace) -> int:
    for name in METHOD_NAMES:
        method, fixed = ALIASES.get(name, (name, {}))
        spec = METHODS[method]
        pair = f" [Sub {spec.sparsify}, F {spec.combine}]" if spec.combine else " [the inner method's Sub and F, then Neuron-Restore]"
        print(f"{name}: {spec.help}" + (f" (= {method} with {fixed})" if fixed else pair))
        for p in schema(name):
            print(f"    {p.name:<12} default {p.default!s:<16} range {p.range_text():<28} {p.help}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import parse_methods
    from .merge import resolve_device
    from .presets import get_preset

    if args.limit is not None and args.limit < 1:
        raise FusionError(f"--limit must be at least 1, got {args.limit}: it is how many text and image probes to use")
    preset, methods, out = get_preset(args.preset), parse_methods(args.methods), Path(args.out)
    if not methods:
        raise FusionError("--methods names no method; give one or more, comma-separated (e.g. neu-p-taska,ties)")
    resolve_device(args.device)  # a missing GPU is said now, not after the first models were scored
    writable_directory(out)  # before minutes of scoring that end by writing there
    with quiet_loading():
        _bench(args, preset, methods, out)
    return 0


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Without transformers' "Loading weights" bars, which would interleave with the bench's
    own progress lines for every model it loads; as before afterwards."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _bench(args: argparse.Namespace, preset: Any, methods: list, out: Path) -> None:
    from .evaluate import run_bench, run_sweep
    from .report import markdown_table

    if args.sweep:
        run_sweep(preset, [m for m, _ in methods], out, device=args.device, seed=args.seed, limit=args.limit)
        print(f"sweep written to {out / 'sweep.json'} and {out / 'sweep.png'}")
    else:
        rows = run_bench(preset, methods, out, device=args.device, seed=args.seed, limit=args.limit)
        print(markdown_table(rows))
        print(f"written to {out}/results.json, results.md, results.png, replies.jsonl")


class _Stderr(logging.StreamHandler):
    """A handler that writes to ``sys.stderr`` as it is when a note is emitted, not as it was
    when the handler was made: a caller of ``main`` (a test, an embedding program) may have
    replaced it since."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _show_notices() -> None:
    """The library's notices (``logging.getLogger("fusion")``, e.g. which pickle files it reads)
    as 'note: ...' lines on stderr, once."""
    logger = logging.getLogger("fusion")
    if not logger.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("note: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a timeout, ``docker stop``, systemd, a closed terminal), raised in the
    main thread like Ctrl-C, so that every clean-up that runs for Ctrl-C (a half-written output
    removed, a lock released) runs for them too."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def terminations_interrupt() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise ``Terminated`` (signal handlers can only be set
    from the main thread; elsewhere, as when a program calls ``main`` from a thread, nothing
    changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise Terminated(signum)

    wanted = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {s: signal.signal(s, interrupt) for s in wanted}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: Sequence[str] | None = None, prog: str = "neuron-fusion") -> int:
    """The command line; returns the exit status (the ``neuron-fusion`` script exits with it)."""
    args = build_parser(prog).parse_args(argv)
    _show_notices()
    commands = {"merge": run_merge, "benchmark": run_benchmark, "export-lm": run_export, "push": run_push, "inspect": run_inspect, "methods": run_methods, "eval": run_eval}
    try:
        with terminations_interrupt():
            return commands[args.command](args)
    except FusionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file the user named (--json, --plot) that cannot be written
        print(f"error: {os_error_line(err)}", file=sys.stderr)
        return 2
    except Terminated as stop:
        print(f"terminated ({signal.Signals(stop.signum).name}); nothing was left behind", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("interrupted; nothing was left behind", file=sys.stderr)
        return 130
