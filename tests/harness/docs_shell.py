"""Runs the docs' ``mtnlg`` and ``python FILE`` commands in processes forked from one warm server.

Importing torch and mtnlg's modules takes seconds of CPU on the 2-core CI machine, and README.md and
docs/*.md have dozens of commands: run as fresh interpreters, the docs test would spend most of its time
importing. Here one server process imports them once; ``mtnlg`` and ``python`` on the PATH are
shims that hand their arguments, working directory, environment and standard streams (the file
descriptors themselves, so pipes and redirections behave as for a real process) to it over a Unix
socket. The server forks a child per command, which runs ``python -m mtnlg ARGS`` (or the script)
exactly as the interpreter would and sends back its exit status, which the shim exits with.
"""

from __future__ import annotations

import json
import os
import runpy
import socket
import sys
import traceback
from pathlib import Path

# The modules every docs command needs, imported once in the server.
WARM = ("torch", "mtnlg.cli", "mtnlg.checkpoint.model", "mtnlg.generate.engine", "mtnlg.generate.console",
        "mtnlg.train.run", "mtnlg.checkpoint.convert", "mtnlg.generate.quantize", "mtnlg.data.preprocess",
        "matplotlib.pyplot")

CLIENT = '''import json, os, socket, sys
path, kind, *args = sys.argv[1:]
body = json.dumps({"kind": kind, "args": args, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
conn = socket.socket(socket.AF_UNIX)
conn.connect(path)
socket.send_fds(conn, [len(body).to_bytes(8, "big") + body], [0, 1, 2])
status = conn.recv(16)
sys.exit(int(status) if status else 1)
'''


def write_shims(directory: Path, sock: Path) -> None:
    """``mtnlg`` and ``python`` in ``directory`` that run through the server at ``sock``."""
    client = directory / "client.py"
    client.write_text(CLIENT, encoding="utf-8")
    run = f"exec {sys.executable} -S -E {client} {sock}"
    shims = {
        "mtnlg": f'{run} mtnlg "$@"\n',
        # `python FILE ...` goes to the server; anything else (python -c, -m) to the interpreter itself
        "python": f'case "$1" in -*|"") exec {sys.executable} "$@";; esac\n{run} python "$@"\n',
    }
    for name, body in shims.items():
        (directory / name).write_text("#!/bin/sh\n" + body, encoding="utf-8")
        (directory / name).chmod(0o755)


def _exit_status(code: object) -> int:
    """The process exit status that ``SystemExit(code)`` gives (a message is printed and gives 1)."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def _run(request: dict) -> int:
    """One command in this (forked) process, as ``python -m mtnlg ARGS`` or ``python FILE ARGS`` would."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    try:
        if request["kind"] == "python":
            sys.argv = list(request["args"])
            sys.path.insert(0, str(Path(sys.argv[0]).resolve().parent))
            runpy.run_path(sys.argv[0], run_name="__main__")
        else:
            sys.argv = ["mtnlg", *request["args"]]
            runpy.run_module("mtnlg", run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as stop:
        return _exit_status(stop.code)
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        return 1


def _child(conn: socket.socket, fds: list[int], request: dict) -> None:
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    status = _run(request)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            pass
    conn.sendall(str(status).encode())
    os._exit(status)


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    size, body = int.from_bytes(data[:8], "big"), data[8:]
    while len(body) < size:
        body += conn.recv(size - len(body))
    return json.loads(body), list(fds)


def _reap() -> bool:
    """Collect one finished child (its CPU time then counts in this process's children's usage)."""
    try:
        return os.waitpid(-1, os.WNOHANG)[0] > 0
    except ChildProcessError:
        return False


def serve(path: str) -> None:
    """Accept commands at ``path`` forever, one forked child each."""
    for module in WARM:
        __import__(module)
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(8)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        while _reap():
            pass
        request, fds = _receive(conn)
        if os.fork() == 0:
            server.close()
            _child(conn, fds, request)
        conn.close()
        for fd in fds:
            os.close(fd)


if __name__ == "__main__":
    serve(sys.argv[1])
