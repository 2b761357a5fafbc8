"""`python -m dpnet.train`: data-parallel training of a dpnet CNN on CIFAR-10.

The command line: flags and a --config TOML file become a TrainConfig; main() runs it on the
MPI world (or on --simulate-ranks threads) and turns a user error into one line and exit 2.
"""

import argparse
import os
import signal
import sys
import threading
import time
import traceback
import typing

from ..checkpoint import CheckpointError
from ..data import DataError
from ..parallel import SimComm, get_comm, launched_by_mpi, launcher_rank
from ..parallel.guardian import expect_exit
from .config import CHOICES, OPTION_HELP, ConfigError, TrainConfig, option_fields, validate
from .loop import NonFiniteLoss, StartupError, stop_signal, train

# Abort kills the launcher's output forwarding too: give it a moment to pass the report on.
ABORT_GRACE_SECONDS = 0.5

# Exit statuses. A failure (an exception or a lost rank, ending the job through MPI_Abort or the
# launcher) exits 1 or with the launcher's own status; a supervisor restarts those, not these:
EXIT_USAGE = 2        # a bad option, data set or checkpoint: the same again would fail the same way
EXIT_DIVERGED = 4     # the loss became inf or nan: so would a restart from the last checkpoint
EXIT_INTERRUPTED = 130  # Ctrl-C: stopped and saved, as asked


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # reported once by main(), not by every rank
        raise ConfigError(message)


def parse_args(argv):
    """TrainConfig from command-line flags and an optional --config TOML file (flags win)."""
    parser = _Parser(prog="python -m dpnet.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="TOML file whose keys are the options below")
    defaults = TrainConfig()
    for f in option_fields():
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        helptext = f"{OPTION_HELP[f.name]} (default: {default})" if default not in (None, "") else OPTION_HELP[f.name]
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        else:
            choices = CHOICES.get(f.name)
            metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
            parser.add_argument(flag, type=_option_type(f, default), default=None, metavar=metavar,
                                choices=choices, help=helptext)
    args = parser.parse_args(argv)
    values = {}
    if args.config:
        values.update(_read_toml(args.config))
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    return TrainConfig(**values, given=tuple(sorted(values)))


def _option_type(field, default):
    """The Python type of a TrainConfig field (int, float, str or bool), Optional[...] unwrapped."""
    if default is not None:
        return type(default)
    kinds = [t for t in typing.get_args(field.type) if t is not type(None)] or [field.type]
    return kinds[0] if kinds[0] in (int, float, str, bool) else str


def _read_toml(path):
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config {path}: {exc}") from exc
    fields = {f.name: f for f in option_fields()}
    values = {k.replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"--config {path}: unknown key(s) {', '.join(unknown)}")
    defaults = TrainConfig()
    for key, value in values.items():
        kind = _option_type(fields[key], getattr(defaults, key))
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, int) and not isinstance(value, bool) if kind is int else
              isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
              isinstance(value, str))
        if not ok:
            raise ConfigError(f"--config {path}: {key} must be {kind.__name__}, got {value!r}")
    return values


def install_abort_hook(comm):
    """Under MPI, an uncaught exception on any rank prints that rank's traceback and aborts
    the whole job (otherwise the other ranks wait forever in their next collective)."""
    def hook(kind, value, tb):
        sys.stderr.write(f"[rank {comm.rank}] uncaught exception, aborting all {comm.size} ranks:\n"
                         + "".join(traceback.format_exception(kind, value, tb)))
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_SECONDS)
        comm.abort(1)
    sys.excepthook = hook


SECOND_CTRL_C_SECONDS = 1.0  # a SIGINT sooner than this after the first is the same one delivered twice
_first_sigint = []


def _on_sigint(signum, frame):
    """The first Ctrl-C stops the run at the next step, saved; a second ends it at once. One
    Ctrl-C may arrive twice (to the rank's group and through its guardian, or `pkill -INT` of both):
    a second within SECOND_CTRL_C_SECONDS counts as the first."""
    now = time.monotonic()
    if stop_signal.is_set():
        if _first_sigint and now - _first_sigint[0] < SECOND_CTRL_C_SECONDS:
            return
        expect_exit()
        os._exit(EXIT_INTERRUPTED)
    _first_sigint[:] = [now]
    stop_signal.set("SIGINT")


def _status(result):
    """Exit status of a finished run: 130 after a stop asked for by Ctrl-C, else 0."""
    return EXIT_INTERRUPTED if result.get("stopped") and stop_signal.signal == "SIGINT" else 0


def main(argv=None):
    """Run the command with argv (default: sys.argv[1:]); returns the exit status: 0, or
    EXIT_USAGE, EXIT_DIVERGED or EXIT_INTERRUPTED."""
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
        if threading.current_thread() is threading.main_thread():
            # SIGTERM (a scheduler's preemption) or Ctrl-C: every rank stops at the same step and saves
            signal.signal(signal.SIGTERM, lambda signum, frame: stop_signal.set("SIGTERM"))
            signal.signal(signal.SIGINT, _on_sigint)
        if config.simulate_ranks and launched_by_mpi():
            raise ConfigError("--simulate-ranks runs logical ranks in one process; under mpirun each of the "
                              "processes would run its own simulated job: use one or the other")
        if config.simulate_ranks:
            validate(config, config.simulate_ranks)
            results = SimComm(config.simulate_ranks).run(lambda c: train(config, c))
            return _status(results[0])
        comm = get_comm()
        if comm.size > 1:
            install_abort_hook(comm)
        try:
            return _status(train(config, comm))
        except SystemExit as exc:  # sys.exit on one rank mid-run: the others would wait for it
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if comm.size > 1 and code != 0:
                sys.stderr.write(f"[rank {comm.rank}] exited with status {code} (sys.exit), aborting all "
                                 f"{comm.size} ranks\n")
                sys.stderr.flush()
                time.sleep(ABORT_GRACE_SECONDS)
                comm.abort(code)
            raise
    except (ConfigError, DataError, CheckpointError, StartupError) as exc:
        if launcher_rank() == 0:
            print(f"python -m dpnet.train: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLoss as exc:  # raised on every rank at the same step: no abort needed
        if launcher_rank() == 0:
            print(f"python -m dpnet.train: error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
