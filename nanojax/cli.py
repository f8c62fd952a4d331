"""What the entry scripts share: one-line errors instead of tracebacks, and a multi-process start
that gives up, with a clear message, instead of waiting forever.

    if __name__ == "__main__":
        cli.run(main)            # instead of absl's app.run(main)

A user error (a bad flag or config key, a missing file, a refused overwrite) prints `error: ...`
lines on stderr and exits non-zero; `--debug` re-raises it to show the traceback.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags

FLAGS = flags.FLAGS
# Exceptions a user causes and can fix: the message is the whole story.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, app.UsageError)


def fail(message: str, code: int = 1) -> NoReturn:
    """Prints every line of `message` as `error: ...` on stderr and exits with `code`."""
    for line in str(message).strip().splitlines() or [""]:
        print(f"error: {line}", file=sys.stderr)
    sys.stderr.flush()
    sys.exit(code)


def _debug(argv: Sequence[str]) -> bool:
    return any(a in ("--debug", "-debug", "--debug=true", "--debug=True", "--debug=1") for a in argv)


def _config_flags() -> list[str]:
    """Names of the config-file flags (DEFINE_config_file): they load a file while parsing."""
    from ml_collections.config_flags import config_flags

    return [name for name, flag in FLAGS._flags().items()
            if isinstance(flag.parser, config_flags.ConfigFileFlagParser)]


def _flag_value(argv: Sequence[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _unknown_overrides(argv: Sequence[str]) -> list[str]:
    """One line per `--config.path=value` whose path the config file does not have."""
    from ml_collections import ConfigDict

    lines = []
    for name in _config_flags():
        path_arg = _flag_value(argv, name)
        overrides = [a for a in argv if re.match(rf"--(no)?{name}\.", a)]
        if not path_arg or not overrides:
            continue
        try:
            config = FLAGS[name].parser.parse(path_arg)
        except Exception:  # noqa: BLE001  (the config itself is the problem: reported as such)
            continue
        for arg in overrides:
            path = arg.split("=", 1)[0].split(".", 1)[1]
            node, walked = config, []
            for part in path.split("."):
                if isinstance(node, ConfigDict) and part in node:
                    node = node[part]
                    walked.append(part)
                    continue
                siblings = list(node.keys()) if isinstance(node, ConfigDict) else []
                close = difflib.get_close_matches(part, siblings, n=1)
                key = ".".join([*walked, part])
                hint = (f"did you mean --{name}.{'.'.join([*walked, close[0]])}?" if close
                        else f"keys there: {', '.join(sorted(siblings))}" if siblings
                        else f"{'.'.join(walked)} is a value, not a group")
                lines.append(f"{arg}: unknown config key {key!r} (not found in {path_arg}); {hint}")
                break
    return lines


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing whose errors are `error: ...` lines and exit code 2, not tracebacks.

    ml_collections raises a bare AttributeError, mid-parse, for a mistyped `--config.key`; this
    names the flag, the key and the nearest real key instead.
    """
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        if _debug(argv):
            raise
        fail(f"{str(e).rstrip('.')}. Pass --helpfull to see every flag.", code=2)
    except Exception as e:  # noqa: BLE001  (raised by a config file or ml_collections while parsing)
        if _debug(argv):
            raise
        unknown = _unknown_overrides(argv)
        if unknown:
            fail("\n".join(unknown), code=2)
        last = [line for line in str(e).splitlines() if line.strip()]
        fail(f"parsing the flags: {type(e).__name__}: {last[-1] if last else ''} "
             "(--debug shows the traceback)", code=2)
    for name in _config_flags():  # a config file that failed to load is only reported on access
        try:
            value = FLAGS[name].value
            if value is not None:
                value.get  # noqa: B018  (an unloadable config raises here)
        except OSError as e:
            if _debug(argv):
                raise
            cause = str(e.__cause__ or e).strip().splitlines()
            fail(f"--{name}={_flag_value(argv, name)}: could not load the config file ({cause[0]}"
                 f"{': ' + cause[-1].strip() if len(cause) > 1 else ''})", code=2)
    return rest


def run(main: Callable[[list[str]], int | None], *,
        user_errors: tuple[type[BaseException], ...] = ()) -> NoReturn:
    """absl's app.run(main), with `--debug`, flag errors as one line, and every user error
    (USER_ERRORS + user_errors) raised by main printed as `error: ...` with exit code 1."""
    if "debug" not in FLAGS:
        flags.DEFINE_bool("debug", False, "On an error, show the Python traceback instead of the "
                          "one-line message.")
    caught = USER_ERRORS + tuple(user_errors)

    def wrapped(argv: list[str]) -> int | None:
        try:
            return main(argv)
        except caught as e:
            if FLAGS.debug:
                raise
            fail(str(e) or type(e).__name__, code=2 if isinstance(e, app.UsageError) else 1)

    app.run(wrapped, flags_parser=parse_flags)
    raise AssertionError("app.run returned")  # it always exits


# ----------------------------------------------------------------------------------------------
# Multi-process start


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def _never_joined(coordinator: str | None, n: int, me: int | None, waited: float) -> str:
    """The message for a start that timed out: who is missing, as far as this process can tell,
    and how to start them."""
    within = f"within --init_timeout={waited:g} s"
    if coordinator is None or not n or me is None:  # --distributed: the cluster started the tasks
        return (f"not every process of the job joined {within}; check that the scheduler started all "
                "of its tasks (and that they can reach each other), or raise --init_timeout.")
    how = f"the same command with --coordinator={coordinator} --num_processes={n}"
    if me == 0:
        if n == 2:
            return (f"process 1 of 2 never joined the coordinator at {coordinator} {within}. Start it "
                    f"with {how} --process_id=1, or raise --init_timeout.")
        return (f"not all of processes 1..{n - 1} joined the coordinator at {coordinator} {within} (the "
                f"coordinator cannot tell which are missing). Start each missing one with {how} and "
                "its own --process_id, or raise --init_timeout.")
    if not _reachable(coordinator):
        return (f"process 0 (the coordinator) never started listening at {coordinator} {within}. Start "
                f"it with {how} --process_id=0 on that host, check HOST:PORT and the firewall, or raise "
                "--init_timeout.")
    others = ", ".join(str(i) for i in range(1, n) if i != me) or "none besides 0"
    return (f"something answers at {coordinator}, but not all {n} processes joined {within} (this is "
            f"process {me}; the others: {others}). Start each missing one with {how} and its own "
            "--process_id, check that process 0 runs there, or raise --init_timeout.")


def init_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None, *,
                     timeout: float = 120.0, report_every: float = 15.0, out: Any = None) -> None:
    """jax.distributed.initialize, giving up after `timeout` seconds with one `error:` line.

    JAX waits for every process to join and, when its own timeout passes, aborts the process with
    a C++ stack trace that blames "another task". Here a watcher thread prints a progress line
    while the start waits, and at `timeout` prints which processes never joined and how to start
    them, then exits with code 1 (before JAX's own, later, deadline). All None: the cluster's
    environment (SLURM, Open MPI) says who and where.
    """
    import jax

    out = out or sys.stderr
    if not timeout > 0:
        raise ValueError(f"--init_timeout={timeout}: must be > 0 seconds")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices across processes
    n = num_processes or 0
    at = coordinator or "the coordinator"
    done = threading.Event()
    start = time.monotonic()

    def watch() -> None:
        next_report = min(5.0, timeout / 2)
        while True:
            left = timeout - (time.monotonic() - start)
            if done.wait(max(0.0, min(left, next_report - (time.monotonic() - start)))):
                return
            elapsed = time.monotonic() - start
            if elapsed >= timeout:
                print(f"error: {_never_joined(coordinator, n, process_id, timeout)}", file=out, flush=True)
                os._exit(1)  # JAX's connect holds the main thread in C++: nothing else can stop it
            if process_id == 0:
                state = f"waiting for {n - 1} of {n} processes at {at}"
            elif coordinator and not _reachable(coordinator):
                state = f"process {process_id} of {n}: waiting for process 0 to listen at {at}"
            else:
                state = f"process {process_id} of {n or '?'}: waiting for the others to join at {at}"
            print(f"{state} ({elapsed:.0f} s of --init_timeout={timeout:g} s) ...", file=out, flush=True)
            next_report = elapsed + report_every

    watcher = threading.Thread(target=watch, name="init_distributed watcher", daemon=True)
    watcher.start()
    try:
        # JAX's deadline is later than ours, so the watcher's message comes first.
        jax.distributed.initialize(coordinator, num_processes, process_id,
                                   initialization_timeout=int(timeout) + 60)
    finally:
        done.set()
