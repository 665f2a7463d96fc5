"""`python -m omnitune.train <flags>`, the seed scripts' `torchrun ... -m omnitune.train <flags>`.

Every worker checks the flags and configs before it starts anything. Under torchrun a bad config
makes the workers exit with status 2 and no traceback; torchrun then prints its own failure report
(ChildFailedError), which would bury the reason. So the worker hands its one line to a tiny helper
process that prints it once torchrun has exited: the reason is the last line of the output (and of
the seed scripts' `| tee` log). Ranks that hit the same error print it once per node (a marker
file named after the run, the launcher and the line).
"""
import hashlib
import os
import subprocess
import sys
import tempfile

# waits until the launcher (argv[1], a pid) has exited, at most 120 s, prints argv[2] to stderr and
# removes the marker argv[3]. A launcher that exited but is not reaped yet (a zombie: its parent, e.g.
# Python's subprocess.run with pipes, reaps it only after our stderr closes) counts as exited, or the
# two would wait on each other for the whole 120 s (measured).
_AFTER_LAUNCHER = """
import os, sys, time
pid, line, marker, end = int(sys.argv[1]), sys.argv[2], sys.argv[3], time.monotonic() + 120

def alive():
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True

while time.monotonic() < end and alive():
    time.sleep(0.05)
sys.stderr.write(line + "\\n")
try:
    os.unlink(marker)
except OSError:
    pass
"""


def report_config_error(message: str) -> None:
    """Print ``omnitune: error: <message>``: directly when not under torchrun, else once per node
    after torchrun's own report."""
    line = f"omnitune: error: {message}"
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        print(line, file=sys.stderr, flush=True)
        return
    launcher = os.getppid()
    key = hashlib.sha1(f"{os.environ['TORCHELASTIC_RUN_ID']}:{launcher}:{line}".encode()).hexdigest()[:16]
    marker = os.path.join(tempfile.gettempdir(), f"omnitune-error-{key}")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:   # another rank of this node reports the same line
        return
    subprocess.Popen([sys.executable, "-c", _AFTER_LAUNCHER, str(launcher), line, marker],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)


def main(argv: list[str]) -> int:
    # the flags first: pydantic only, so a bad flag is reported before torch and transformers load
    from omnitune.config.errors import ConfigError
    from omnitune.config.train import parse_train_args

    try:
        parse_train_args(argv)
    except ConfigError as e:
        report_config_error(str(e))
        return 2
    from omnitune.data.formats import DataError
    from omnitune.train.trainer import make_plan, run

    try:
        plan, dry_run = make_plan(argv)
        if dry_run:
            print(plan.describe())
            return 0
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        report_config_error(str(e))
        return 2
    return run(plan, report=report_config_error)


def _exit(code: int) -> None:
    """A torchrun worker leaves without interpreter finalisation once its work is done and flushed
    (process groups destroyed, checkpoints and logs closed): under load a worker aborted at exit in
    C++ teardown ("terminate called without an active exception", SIGABRT) after a complete run,
    twice in CI (once after a barrier before destroy_process_group), and torchrun then reported the
    finished job as failed. Outside torchrun the normal exit is kept."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main(sys.argv[1:]))
