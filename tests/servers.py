"""Real cache servers for the tests and the bench, on loopback: Debian's nginx with its WebDAV module (GET, PUT), as
ccache's HTTP storage wants it, and Debian's redis-server with a password."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PASSWORD = "s3cret%2Fpw"  # percent-encoded in the URL, as ccache's manual says a `/` must be
NGINX_CONF = """worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
{user}
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  server {{
    listen 127.0.0.1:{port};
    root {data};
    client_max_body_size 0;
    location / {{ dav_methods PUT DELETE; create_full_put_path on; }}
  }}
}}
"""


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    stored: Callable[[], int]  # how many entries the server holds
    directory: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"the server on port {port} did not start")


def start_nginx(directory: Path, data: Path | None = None) -> Server:
    """nginx serving `data` (by default `directory/data`) with PUT, the way ccache's HTTP storage wants it; its
    configuration, logs and temporary files in `directory`."""
    data = data or directory / "data"
    data.mkdir(parents=True, exist_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    user = "user root;" if os.geteuid() == 0 else ""  # its workers write the test's directory
    (directory / "nginx.conf").write_text(NGINX_CONF.format(d=directory, data=data, port=port, user=user))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    process = subprocess.Popen([nginx, "-c", str(directory / "nginx.conf"), "-p", str(directory), "-g", "daemon off;"])
    _listening(port, process)

    def stored() -> int:
        return sum(1 for p in data.rglob("*") if p.is_file())

    return Server(f"http://127.0.0.1:{port}/ccache", process, stored, directory)


def start_redis(directory: Path) -> Server:
    """redis-server on loopback that takes only the password's clients, as a shared one should."""
    directory.mkdir(parents=True)
    port = free_port()
    password = PASSWORD.replace("%2F", "/")
    argv = [shutil.which("redis-server") or "/usr/bin/redis-server", "--bind", "127.0.0.1", "--port", str(port)]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(directory), "--requirepass", password]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _listening(port, process)

    def stored() -> int:
        cli = [shutil.which("redis-cli") or "/usr/bin/redis-cli", "-p", str(port), "--no-auth-warning", "-a", password]
        return int(subprocess.run([*cli, "dbsize"], capture_output=True, text=True, check=True).stdout.strip())

    return Server(f"redis://{PASSWORD}@127.0.0.1:{port}", process, stored, directory)
