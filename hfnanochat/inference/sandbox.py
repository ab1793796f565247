"""
The two tools a nanochat model may call: a calculator for the python parts of its answers, and full
Python execution for HumanEval-style checks.

calculator(expr) -> str | None
- What the engine calls between <|python_start|> and <|python_end|>, in SFT data, GSM8K eval and
  chat. None means "force nothing", exactly as in nanochat. `calculator_with_errors` is the same
  calculator answering "error: <why>" instead of None (RL rollouts: the failure is visible).
- Accepts what nanochat's use_calculator accepts: commas removed; arithmetic over the characters
  `0123456789*+-/%.() ` with `**` refused; or a single `'literal'.count('literal')` (spelling tasks).
  Our additions: `%`, and any characters inside the two string literals (nanochat allows letters,
  digits and `._ ` there).
- Never calls eval: the expression is parsed with `ast` and a whitelist of nodes is walked, so no
  name, attribute, subscript or call other than str.count can run. Every number (literal or
  intermediate) is capped at 1e15 in magnitude; without `**` that bounds the work, and it keeps
  str(float) out of scientific notation (it switches at 1e16).
- Formatting differs from nanochat on purpose. nanochat forces str(eval(expr)), so `48/2` gives
  "24.0" while the GSM8K annotation the model was trained on says `<<48/2=24>>`. We round floats to
  10 decimals (removes binary noise such as 70*.01*90 = 63.00000000000001, far below GSM8K's
  precision), print integral values without ".0" and never use exponents. Measured on all 27,998
  GSM8K train+test annotations: the forced text equals the annotated text for 27,175 (97.1%;
  nanochat's str(): 20,508, 73.3%); both are right to 1e-6 on every numeric one (one says 3/4=3/4).

execute(code, timeout, memory_mb) -> ExecutionResult
- Runs code in a fresh interpreter (`sys.executable -I -B`), the way nanochat HEAD does, hardened
  along performance-reliability.md §E3:
  * its own session and process group, SIGKILLed as a whole when the call ends (at the wall-clock
    deadline or after a normal exit), so a grandchild it managed to spawn can't outlive the call;
  * rlimits: address space and data = memory_mb, CPU seconds = ceil(timeout)+1 (a backstop should
    the parent die before its deadline), file size 16 MiB, 64 open files, no core dumps, and
    RLIMIT_NPROC = 0 (no new processes *or threads*; the kernel ignores this limit for root);
  * a throw-away working directory, removed afterwards; environment reduced to PATH; stdin empty;
  * stdout and stderr read concurrently with a 64 KiB cap each (the rest is drained and counted,
    never stored), so a print loop can't fill the caller's memory;
  * before the code runs: destructive or process-creating functions of os and shutil raise
    PermissionError (nanochat's reliability_guard list plus exec*/spawn*/posix_spawn/popen/_exit),
    open()/io.open()/os.open() refuse paths outside the working directory (reads included), and a
    meta-path hook refuses imports of ctypes, socket, ssl, subprocess, multiprocessing, posix,
    resource, pty and their C halves.
- The code runs to its end or fails: an exception, SystemExit (any code, as in OpenAI's human-eval,
  so a sample can't `exit(0)` past its asserts), a signal or the deadline. The error is one short
  line: the exception's type and the first line of its message ("ZeroDivisionError: division by
  zero"), "Timeout after 5.0s", "Killed by signal SIGSEGV", or "Exit code N". The child's bootstrap
  writes that exception line to a pipe of its own, since the last stderr line may be the rest of a
  multi-line message or an exception note, and signals a MemoryError (subclasses included, e.g.
  numpy's _ArrayMemoryError) with its own exit code, which sets memory_exceeded.

What this is not: a security sandbox. The guards inside the child's interpreter are ordinary Python
objects that hostile code can reach around (gc, frame introspection, _io.FileIO, ...); they stop
accidents and the obvious calls. The real containment is only the separate process, its rlimits,
the process-group kill and the deadline. Not contained at the OS level: network access, reading
world-readable files, writing wherever the parent's user may write, and, when the parent is root,
process creation (RLIMIT_NPROC does not bind root). For untrusted code at scale, run the whole thing
inside a container or bubblewrap (--unshare-all --die-with-parent).

Platforms: Linux gets everything above. macOS skips RLIMIT_AS/RLIMIT_DATA (not enforced there), so
memory is not capped. Windows is not supported (no rlimits, process groups or selectable pipes).
"""

import ast
import decimal
import math
import operator
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# -----------------------------------------------------------------------------
# Calculator

_ARITHMETIC_CHARS = set("0123456789*+-/%.() ")
# GSM8K's largest annotated quantity is 2.92e9; 1e15 leaves room for any real word problem and is
# below 1e16, where str(float) starts printing exponents and floats stop holding every integer.
_MAX_ABS = 10**15
_BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARY_OPS = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class _Refused(Exception):
    pass


def _checked(value):
    if abs(value) > _MAX_ABS:
        raise _Refused("a number beyond 1e15")
    return value


def _arithmetic(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _checked(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        return _checked(_BINARY_OPS[type(node.op)](_arithmetic(node.left), _arithmetic(node.right)))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _UNARY_OPS[type(node.op)](_arithmetic(node.operand))
    raise _Refused("not arithmetic")


def _is_str(node):
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _format(value):
    if isinstance(value, float):
        value = round(value, 10)
        if value.is_integer():
            return str(int(value))
        # Decimal of the shortest repr, printed positionally: 1e-05 -> "0.00001", 2.5 -> "2.5"
        return format(decimal.Decimal(repr(value)), "f")
    return str(value)


def _calculate(expr: str) -> tuple[str | None, str | None]:
    """(result, None), or (None, why the expression was refused)."""
    if not isinstance(expr, str):
        raise ValueError(f"calculator expects a str expression, got {type(expr).__name__}")
    expr = expr.replace(",", "").strip()  # "1,000" is how GSM8K writes numbers
    try:
        if set(expr) <= _ARITHMETIC_CHARS:
            if "**" in expr:  # exponentiation is the one operator that makes numbers explode
                return None, "** is not allowed"
            return _format(_arithmetic(ast.parse(expr, mode="eval").body)), None
        call = ast.parse(expr, mode="eval").body
        if (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and call.func.attr == "count"
            and _is_str(call.func.value)
            and len(call.args) == 1
            and _is_str(call.args[0])
            and not call.keywords
        ):
            return str(call.func.value.value.count(call.args[0].value)), None
        return None, "only arithmetic or 'text'.count('x')"
    except _Refused as e:
        return None, str(e)
    except SyntaxError:
        return None, "invalid syntax"
    except ZeroDivisionError:
        return None, "division by zero"
    except (ArithmeticError, ValueError, RecursionError, MemoryError) as e:
        # ValueError: null bytes; Recursion/MemoryError: absurd nesting
        return None, type(e).__name__


def calculator(expr: str) -> str | None:
    """Evaluate a tool call's expression; return the text to force into the stream, or None (refused)."""
    return _calculate(expr)[0]


def calculator_with_errors(expr: str) -> str:
    """`calculator`, but a refused expression gives `error: <why>` ("error: division by zero") instead of None, so
    the model reads why its call failed (RL rollouts use it; nanochat forces nothing)."""
    result, error = _calculate(expr)
    return f"error: {error}" if result is None else result


# -----------------------------------------------------------------------------
# Python execution


@dataclass
class ExecutionResult:
    success: bool  # the code ran to its end (exit status 0) within the deadline
    stdout: str
    error: str | None  # one line: "Type: first line of the message", "Timeout after 5.0s", "Killed by signal X", ...
    timed_out: bool
    stderr: str = ""
    memory_exceeded: bool = False  # the code died of a MemoryError (or a subclass of it)


_OUTPUT_CAP = 64 * 1024  # bytes kept per stream: HumanEval checks print little; a runaway print loop prints without end
_TAIL_BYTES = 4096  # last bytes of stderr kept apart from the cap, so the error line survives truncation
_MEMORY_ERROR_EXIT = 3  # the bootstrap's exit status for a MemoryError; any other exception exits 1
_READ_CHUNK = 64 * 1024
_MIN_MEMORY_MB = 64  # the interpreter alone maps ~15 MB; below this, ordinary code dies of MemoryError
_CHILD_ENV = {"PATH": "/usr/bin:/bin"}  # nothing of the caller's environment (tokens, keys) reaches the code

# Runs in the child before the untrusted code. argv: memory_mb, cpu_seconds, the write end of the summary pipe
# (which gets the exception's one-line summary). The code arrives on stdin.
_BOOTSTRAP = r"""
import builtins, io, linecache, os, shutil, sys, traceback
code = sys.stdin.buffer.read().decode("utf-8", "surrogatepass")
devnull = os.open(os.devnull, os.O_RDONLY)
os.dup2(devnull, 0)  # the code sees an empty stdin: input() raises EOFError
os.close(devnull)
report_fd = os.dup(2)  # the final traceback gets out even if the code closes sys.stderr or fd 2
exit_now = os._exit

memory_mb, cpu_seconds, summary_fd = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
import resource
limits = [
    (resource.RLIMIT_CPU, cpu_seconds),
    (resource.RLIMIT_FSIZE, 16 << 20),
    (resource.RLIMIT_NOFILE, 64),
    (resource.RLIMIT_CORE, 0),  # a crash must not spend seconds writing a core file
    (resource.RLIMIT_NPROC, 0),
]
if sys.platform != "darwin":  # macOS refuses or ignores these
    limits += [(resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_DATA, memory_mb << 20)]
for which, value in limits:
    hard = resource.getrlimit(which)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(which, (value, value))

def disabled(name):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")
    return refuse

for name in (
    "system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp", "kill", "killpg", "_exit",
    "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
    "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
    "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "link",
    "symlink", "mkfifo", "mknod", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chflags",
    "lchflags", "chroot", "chdir", "fchdir", "setuid", "seteuid", "setreuid", "setresuid", "setgid",
    "setsid", "setpgid",
):
    if hasattr(os, name):
        setattr(os, name, disabled(f"os.{name}"))
for name in ("rmtree", "move", "chown"):
    setattr(shutil, name, disabled(f"shutil.{name}"))

workdir = os.path.realpath(os.getcwd())
real_open, real_os_open = io.open, os.open

def check_path(path):
    path = os.path.realpath(os.fsdecode(path))
    if path != workdir and not path.startswith(workdir + os.sep):
        raise PermissionError(f"access outside the sandbox's working directory is disabled: {path}")

def guarded_open(file, *args, **kwargs):
    if not isinstance(file, int):  # an int is an already open descriptor, e.g. open(1, "w")
        check_path(file)
    return real_open(file, *args, **kwargs)

def guarded_os_open(path, *args, dir_fd=None, **kwargs):
    if dir_fd is not None:
        raise PermissionError("os.open with dir_fd is disabled in the sandbox")
    check_path(path)
    return real_os_open(path, *args, **kwargs)

builtins.open = io.open = guarded_open
os.open = guarded_os_open

BLOCKED = {
    "ctypes", "_ctypes", "socket", "_socket", "ssl", "_ssl", "subprocess", "_posixsubprocess",
    "multiprocessing", "_multiprocessing", "posix", "resource", "pty",
}

class BlockImports:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"import of {name!r} is disabled in the sandbox")
        return None

sys.meta_path.insert(0, BlockImports())
for name in list(sys.modules):  # imported during start-up (posix): forget them so import asks the hook
    if name.partition(".")[0] in BLOCKED:
        del sys.modules[name]
del resource

def flush_standard_streams():
    for stream in (sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:  # the code may have closed them
            pass

filename = "<sandbox>"
linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)  # source lines in tracebacks
user_globals = {"__name__": "__main__", "__builtins__": builtins}
try:
    exec(compile(code, filename, "exec"), user_globals)
except BaseException as exc:
    user_globals.clear()  # free what the code allocated: formatting a MemoryError needs memory
    try:
        # the innermost 50 frames say what failed; a recursion bomb has a million
        report = "".join(traceback.format_exception(exc, limit=-50))
    except BaseException:  # out of memory again, or a hostile __str__
        report = type(exc).__name__ + "\n"
    try:
        # "Type: first line of the message"; the notes, which format_exception_only would add after it, go
        summary = traceback.TracebackException.from_exception(exc, limit=0)
        summary.__notes__ = None
        summary = list(summary.format_exception_only())[-1].splitlines()[0].strip()
    except BaseException:
        summary = type(exc).__name__
    flush_standard_streams()
    for fd, text in ((report_fd, report), (summary_fd, summary)):
        data = text.encode("utf-8", "replace")
        while data:
            data = data[os.write(fd, data):]
    exit_now(3 if isinstance(exc, MemoryError) else 1)  # 3: _MEMORY_ERROR_EXIT
flush_standard_streams()
exit_now(0)  # skip atexit handlers the code may have registered
"""


class _Capture:
    """The first _OUTPUT_CAP bytes of a stream, its last _TAIL_BYTES, and how many bytes it had."""

    def __init__(self):
        self.head = bytearray()
        self.tail = b""
        self.total = 0

    def feed(self, chunk):
        self.total += len(chunk)
        if len(self.head) < _OUTPUT_CAP:
            self.head += chunk[: _OUTPUT_CAP - len(self.head)]
        self.tail = (self.tail + chunk)[-_TAIL_BYTES:]

    def text(self):
        text = self.head.decode("utf-8", "replace")
        if self.total > len(self.head):
            text += f"\n[output truncated: {self.total - len(self.head)} more bytes]"
        return text

    def last_line(self):
        lines = self.tail.decode("utf-8", "replace").strip().splitlines()
        return lines[-1].strip() if lines else None


def _communicate(proc, data, deadline, captures):
    """Feed the code, then read the pipes of `captures` ({fd: _Capture}) until EOF and exit, or the deadline.
    Returns whether the deadline passed."""
    try:
        with proc.stdin:
            proc.stdin.write(data)
    except BrokenPipeError:  # the child died before reading its code; its stderr says why
        pass
    with selectors.DefaultSelector() as selector:
        for fd in captures:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, _READ_CHUNK)
                if chunk:
                    captures[key.fd].feed(chunk)
                else:
                    selector.unregister(key.fd)
    # EOF on both pipes; the code may still run with its outputs closed
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
        return True
    return False


def _kill_group(proc):
    # the child leads its own process group; whatever it spawned goes down with it
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # group already empty (macOS says EPERM for zombies)
        pass
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()


def execute(code: str, timeout: float = 5.0, memory_mb: int = 512) -> ExecutionResult:
    """Run Python `code` in a separate, limited process; never raises or hangs because of the code."""
    if not isinstance(code, str):
        raise ValueError(f"code must be a str, got {type(code).__name__}")
    if not (isinstance(timeout, (int, float)) and 0 < timeout < math.inf):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not (isinstance(memory_mb, int) and memory_mb >= _MIN_MEMORY_MB):
        raise ValueError(f"memory_mb must be an int >= {_MIN_MEMORY_MB}, got {memory_mb!r}")
    if os.name != "posix":
        raise RuntimeError("execute() needs a POSIX system (rlimits, process groups, selectable pipes)")
    with tempfile.TemporaryDirectory(prefix="hfnanochat-sandbox-", ignore_cleanup_errors=True) as workdir:
        # the bootstrap writes the exception's summary line here, apart from anything the code wrote to stderr
        summary_read, summary_write = os.pipe()
        with open(summary_read, "rb", buffering=0) as summary_pipe:
            try:
                argv = [str(memory_mb), str(math.ceil(timeout) + 1), str(summary_write)]
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-B", "-X", "utf8", "-c", _BOOTSTRAP, *argv],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    pass_fds=(summary_write,),
                    cwd=workdir,
                    env=_CHILD_ENV,
                    start_new_session=True,
                )
            finally:
                os.close(summary_write)  # only the child's copy stays open: EOF comes when it exits
            out, err, summary = _Capture(), _Capture(), _Capture()
            captures = {proc.stdout.fileno(): out, proc.stderr.fileno(): err, summary_pipe.fileno(): summary}
            try:
                timed_out = _communicate(
                    proc, code.encode("utf-8", "surrogatepass"), time.monotonic() + timeout, captures
                )
            finally:
                _kill_group(proc)
    returncode = proc.returncode
    if timed_out:
        error = f"Timeout after {timeout}s"
    elif returncode == 0:
        error = None
    elif returncode < 0:
        try:
            error = f"Killed by signal {signal.Signals(-returncode).name}"
        except ValueError:  # a signal without a name (real-time signals)
            error = f"Killed by signal {-returncode}"
    else:
        # no summary: the child died before its bootstrap could write one (its stderr says why)
        error = summary.head.decode("utf-8", "replace") or err.last_line() or f"Exit code {returncode}"
    return ExecutionResult(
        success=error is None,
        stdout=out.text(),
        error=error,
        timed_out=timed_out,
        stderr=err.text(),
        memory_exceeded=not timed_out and returncode == _MEMORY_ERROR_EXIT,
    )
