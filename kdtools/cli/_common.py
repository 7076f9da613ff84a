"""What every command shares: error handling and exit codes, progress bars, stdin/stdout rules."""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import click
import typer

try:  # typer >= 0.29 bundles its own click; its exceptions are not click's
    from typer._click import exceptions as _typer_click_exceptions
except ImportError:  # pragma: no cover - older typer uses click itself
    _typer_click_exceptions = click.exceptions
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..errors import KdError, KdUsageError
from ..fileio import HDF5_FILENAME  # HDF5's reports name their file inside the text
from ..progress import ProgressEvent

stderr = Console(stderr=True)

# set by the --debug option of each command; read by run_app when an error escapes
DEBUG = {"on": False}


def debug_option(value: bool) -> bool:
    DEBUG["on"] = value
    return value


DebugOption = typer.Option(False, "--debug", help="Show full tracebacks on errors.", callback=debug_option, is_eager=True)


class Terminated(BaseException):
    """SIGTERM: a batch scheduler's time limit, `kill`, or torchrun stopping the other ranks when one dies.
    Raised in the main thread and unwound like Ctrl-C (a BaseException, so no `except Exception` in the
    library swallows it), so temporary files are removed and the one-line contract still holds."""


# what a long command keeps when it is stopped, and how to go on; set by the command before the long
# work starts, appended to the "interrupted" / "terminated" line
STOP_HINT = {"text": ""}


def _raise_terminated(signum, frame) -> None:
    # once is enough: a second SIGTERM (a scheduler and torchrun both forwarding one) must not interrupt the
    # cleanup and the one-line report the first one started
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


class StopsAtBoundaries:
    """Ctrl-C and SIGTERM held until the work reaches a safe point: the handlers only note the signal, the work
    polls ``requested()`` between two steps (kdtools.diffusion.training.fit's ``stop_requested``), saves, and
    stops; ``stop()`` then raises what the signal would have (KeyboardInterrupt, Terminated). A second Ctrl-C
    while waiting stops at once, for work whose step never ends."""

    def __init__(self):
        self.signum = None  # the first signal: it says how the stop is reported (SIGTERM: exit 143, Ctrl-C: 130)
        self.interrupts = 0  # a second Ctrl-C stops at once (130), whatever came first
        self.terminated = False  # a SIGTERM came (first or not): another one is then ignored

    def requested(self) -> bool:
        return self.signum is not None

    def _note(self, signum, frame) -> None:
        if signum == signal.SIGTERM:
            self.terminated = True
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts >= 2:
                raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum

    def __enter__(self):
        self.active = threading.current_thread() is threading.main_thread()
        if self.active:
            self.previous = {s: signal.signal(s, self._note) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            for s, handler in self.previous.items():
                signal.signal(s, handler)
            if self.terminated:
                # as _raise_terminated: one is enough; a second (a scheduler and torchrun both forwarding one) must
                # not interrupt the one-line report of the first
                signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def stop(self) -> None:
        """Raise what the noted signal stands for (after the work saved its state)."""
        raise Terminated() if self.signum == signal.SIGTERM else KeyboardInterrupt()


def _stopped(what: str) -> str:
    return what + (f"; {STOP_HINT['text']}" if STOP_HINT["text"] else "")


def make_app(help: str) -> typer.Typer:
    return typer.Typer(help=help, add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                       context_settings={"help_option_names": ["-h", "--help"]})


def fail(message: str, code: int = 1) -> None:
    """Print one line on stderr and exit with ``code``."""
    # messages quote file names, server replies and library errors: never read them as rich markup
    # (nor ":abc:" as an emoji code: "topk:abc" must print as typed)
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True, emoji=False)
    raise SystemExit(code)


def warn(message: str) -> None:
    stderr.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True, emoji=False)


def info(message: str) -> None:
    stderr.print(message, highlight=False, soft_wrap=True, markup=False, emoji=False)


class _ClosedStdout:
    """Stands in for ``sys.stdout`` when a command was started with stdout closed (``cmd >&-``; Python then sets
    it to None): writing data is a one-line error instead of a TypeError, and a command that writes to -o FILE
    does not notice."""

    def write(self, *args):
        raise KdError("stdout is closed (the command was started with >&-): nowhere to write the data; "
                      "give -o FILE or leave stdout open")

    writelines = write

    @property
    def buffer(self):
        return self

    def flush(self):  # Python flushes stdout at exit: nothing to do
        pass

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        raise OSError("stdout is closed")


def run_app(app: typer.Typer, prog_name: str) -> None:
    """Run a typer app with kdtools' exit-code contract: 0 ok, 1 data/runtime error, 2 usage error."""
    if sys.stdout is None:
        sys.stdout = _ClosedStdout()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)  # kd-serve installs its own (a clean shutdown)
    try:
        rc = app(prog_name=prog_name, standalone_mode=False)
        if rc == 130:
            # typer turns Ctrl-C (KeyboardInterrupt) into a *returned* 130 when not standalone: without this
            # the command would exit 0, silently, after the commands' own cleanup had already run
            fail(_stopped("interrupted"), 130)
    except (click.exceptions.Exit, typer.Exit) as e:  # --help and explicit typer.Exit
        raise SystemExit(e.exit_code)
    except (click.exceptions.Abort, typer.Abort):
        fail("aborted", 130)
    except (click.ClickException, _typer_click_exceptions.ClickException) as e:  # bad flags: usage error
        e.show(file=sys.stderr)
        raise SystemExit(2)
    except KdError as e:
        if DEBUG["on"]:
            traceback.print_exc()
        fail(str(e), e.exit_code)
    except BrokenPipeError:
        _broken_pipe()
    except SystemExit as e:
        # click answers a broken pipe itself with a silent exit 1; give it the one line all our exits 1 have
        if e.code == 1 and isinstance(e.__context__, BrokenPipeError):
            _broken_pipe()
        raise
    except KeyboardInterrupt:
        fail(_stopped("interrupted"), 130)
    except Terminated:
        fail(_stopped("terminated (SIGTERM)"), 143)
    except Exception as e:  # anything else is a bug or an environment problem: still one line
        if DEBUG["on"]:
            traceback.print_exc()
        fail(describe_unexpected(e, DEBUG["on"]), 1)


# what the machine, not the data or the code, refused: a full disk, a quota, a read-only file system, an I/O error.
# These are said as the file and the system's reason (no traceback hint: there is no bug to report)
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.EACCES, errno.EPERM}


def describe_unexpected(e: BaseException, debug: bool = False) -> str:
    """One line for an exception no command anticipated: ``FILE: reason`` for a refusal of the machine (a full
    disk ...), otherwise the exception's type and text with every line break folded into a space."""
    if isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRNOS:
        found = HDF5_FILENAME.search(str(e))
        name = e.filename if e.filename is not None else (found.group(1) if found else None)
        reason = os.strerror(e.errno)
        return f"{name}: {reason}" if name else reason
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text + ("" if debug else " (run with --debug for the traceback)")


def _broken_pipe() -> None:
    # the reader went away (`| head`, or a downstream command that failed): not our error, but the output is
    # cut short, so the one line says so; stdout goes to devnull so Python's own report at exit stays silent
    try:
        sys.stdout = open(os.devnull, "w")
    except OSError:
        pass
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        raise SystemExit(0)  # `kd-query --help | head`: the reader had what it wanted; help is no data to lose
    fail("stdout was closed by the reader (broken pipe): the output is incomplete", 1)


def binary_stdout():
    """The binary stdout, refusing a terminal: a stream of tensors would only garble it."""
    if sys.stdout.isatty():
        raise KdUsageError("refusing to write a binary stream to a terminal; redirect it to a file or pipe it "
                           "into another kd- command (or use -o FILE)")
    return sys.stdout.buffer


def binary_stdin():
    if sys.stdin is None or sys.stdin.isatty():
        raise KdUsageError("expected a stream on standard input, but it is a terminal; pipe data in or name a file")
    return sys.stdin.buffer


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Callable[[ProgressEvent], None]]:
    """A progress callback drawing rich bars on stderr, one per task name."""
    if not enabled:
        yield lambda event: None
        return
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                        console=stderr, transient=False, disable=not stderr.is_terminal and not os.environ.get("KD_PROGRESS"))
    tasks: dict[str, int] = {}

    def callback(event: ProgressEvent) -> None:
        text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in event.info.items())
        if event.task not in tasks:
            tasks[event.task] = progress.add_task(event.task, total=event.total, info=text)
        progress.update(tasks[event.task], completed=event.completed, total=event.total, info=text)
        if event.done:
            progress.update(tasks[event.task], visible=True)

    with progress:
        yield callback


@contextmanager
def progress_reporter(enabled: bool = True, what: str = "kdtools", every: float = 30.0):
    """Progress bars on a terminal; without one (logs, CI, a pipe) a line at the start and then every
    ``every`` seconds, as kd-gen-queries does, so long work does not look stuck."""
    with progress_bars(enabled) as bars:
        last = {"t": None}

        def callback(event) -> None:
            bars(event)
            if not enabled or stderr.is_terminal or event.done:
                return
            now = time.monotonic()
            if last["t"] is None or now - last["t"] >= every:
                last["t"] = now
                figures = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in event.info.items())
                total = f"/{event.total:.0f}" if event.total else ""
                info(f"{what}: {event.task} {event.completed:.0f}{total}" + (f"  {figures}" if figures else ""))

        yield callback


def device_option_help() -> str:
    return "auto | cpu | cuda | cuda:N"


DeviceOption = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N")
DataRootOption = typer.Option(None, "--data-root", help="Root of torchvision datasets (default: $KD_DATA/vision).")


def data_root(option: str | None):
    """The image data root: --data-root, else $KD_DATA/vision. Only the CLI reads the environment."""
    from ..data import data_root_from

    return data_root_from(option, os.environ.get("KD_DATA"))


def open_sink(header, output: str | None):
    """A SampleSink on stdout ('-' or None; never a terminal) or on a file."""
    from ..sources import SampleSink

    if output is None or output == "-":
        return SampleSink(header, out=binary_stdout())
    return SampleSink(header, path=output)


def stdin_if(path: str | None):
    return binary_stdin() if path is None or path == "-" else None


def distributed_setup(device_opt: str):
    """(rank, world_size, device): under torchrun (WORLD_SIZE > 1) joins the process group, each rank on its
    own GPU (LOCAL_RANK) with nccl, or on the CPU with gloo; otherwise (0, 1, the resolved device)."""
    import torch

    from ..device import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_opt)
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def finish_distributed(world: int, wait: bool = True) -> None:
    """End a torchrun process's part: free what still holds the process group, wait for every rank (not with
    ``wait=False``: after a failure, when another rank may never come), destroy the group."""
    if world > 1:
        import gc

        import torch.distributed as dist

        if not dist.is_initialized():
            return
        # DistributedDataParallel sits in a reference cycle, so without a collection it (and the gloo state it
        # holds) is freed only while the interpreter shuts down: one rank in twenty then died of SIGABRT
        # ("terminate called without an active exception") after its work was done, in 40 loaded runs of the
        # torchrun test's command; 0 in 80 with the collection first (session 25)
        gc.collect()
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def parse_arch_args(text: str, flag: str) -> dict:
    """An architecture's arguments given as a JSON object on the command line (kd-distill --arch-args,
    kd-gen-queries --substitute-args)."""
    import json

    try:
        value = json.loads(text)
    except ValueError:
        raise KdUsageError(f"{flag} is not JSON: {text!r}") from None
    if not isinstance(value, dict):
        raise KdUsageError(f"{flag} must be a JSON object such as '{{\"width\": 2}}', not {text!r}")
    return value


def png_path(path: Optional[str], flag: str) -> Optional[str]:
    """``path`` if it names a PNG; a usage error before any work otherwise (the figure is written as PNG,
    and PNG bytes under another name only mislead the next program that opens it)."""
    if path is not None and not path.lower().endswith(".png"):
        raise KdUsageError(f"{flag} {path}: the figure is written as PNG; give a file name ending in .png")
    return path


# ------------------------------------------------------------------------------------------------
# Output paths, checked before any work (before a query is paid, before an epoch is trained)


def file_key(path: str):
    """What identifies the file a path names: device and inode when it exists, else its resolved path.

    An output whose folder does not exist yet may still land on an existing file: 'new/../labels.csv' is
    labels.csv (the writer follows '..' and links, see fileio.atomic_path), so the resolved path is tried too."""
    for candidate in (path, os.path.realpath(path)):
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        return ("file", st.st_dev, st.st_ino)
    return ("path", os.path.realpath(path))


def check_paths(outputs: dict[str, Optional[str]], inputs: dict[str, list] = {}, stdout_flag: Optional[str] = "-o",
                stdout_carries: str = "the data") -> None:
    """Output paths are checked before any work: '-' only for ``stdout_flag`` (stdout carries the data), none
    is a directory or under a file, no two are the same file, and none is one of the inputs.

    ``inputs`` maps how an input is named in the message to its paths: a flag (``--truth`` -> "the --truth
    file") or a phrase starting with "the " used as it is ("the label file"). A file both read and
    written (a state, a query log that is resumed) is given once, as an output."""
    seen: dict[tuple, str] = {}
    for flag, path in outputs.items():
        if not path:
            continue
        if path == "-":
            if flag == stdout_flag:
                continue
            why = f" (stdout carries {stdout_carries})" if stdout_flag else ""
            raise KdUsageError(f"{flag} -: '-' would be a file named '-'{why}; give {flag} a file name")
        if Path(path).is_dir():
            raise KdUsageError(f"{flag} {path}: is a directory; give a file name")
        parent = Path(path).parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent  # missing folders are created; the first existing one must be a folder
        if not parent.is_dir():
            raise KdUsageError(f"{flag} {path}: {parent} is not a directory")
        if Path(path).exists() and not Path(path).is_file():
            continue  # a device such as /dev/null: several outputs may share it
        key = file_key(path)
        if key in seen:
            raise KdUsageError(f"{seen[key]} and {flag} name the same file {path}; give each output its own file")
        seen[key] = flag
    for iflag, paths in inputs.items():
        for p in paths or []:
            if not p or p == "-" or not Path(p).is_file():
                continue
            oflag = seen.get(file_key(p))
            if oflag:
                what = iflag if iflag.startswith("the ") else f"the {iflag} file"
                raise KdUsageError(f"{oflag} {outputs[oflag]} is {what} {p}: writing it would overwrite the input; "
                                   f"give {oflag} another file")


def oracle_files(spec: Optional[str]) -> list[str]:
    """The local files an oracle spec reads: a model file, an ensemble's members, a replayed log (none for
    http(s):// and exec:)."""
    if not spec or spec.startswith(("http://", "https://", "exec:")):
        return []
    if spec.startswith("replay:"):
        return [spec[len("replay:"):]]
    if spec.startswith("ensemble:"):
        return [p.strip() for p in spec[len("ensemble:"):].split(",") if p.strip()]
    return [spec]
