"""nginx for the benchmark, when it is installed: a static backend and a streaming proxy.

Both run in the foreground with one worker process (Ollana is one process too), on
127.0.0.1, with everything (configuration, logs, temporary files) in the run's directory.
The proxy is configured as a streaming reverse proxy should be for Ollama: HTTP/1.1 with
kept-alive upstream connections, no response buffering and no request buffering, and it
writes an access log, as Ollana and the stock proxy do.
"""

from __future__ import annotations

import os
import shutil

COMMON = """\
worker_processes 1;
daemon off;
pid {dir}/{name}.pid;
error_log {dir}/{name}-error.log warn;
events {{ worker_connections 8192; }}
http {{
  client_body_temp_path {dir}/{name}-body;
  proxy_temp_path {dir}/{name}-proxy;
  fastcgi_temp_path {dir}/{name}-fastcgi;
  uwsgi_temp_path {dir}/{name}-uwsgi;
  scgi_temp_path {dir}/{name}-scgi;
  keepalive_requests 1000000;
  client_max_body_size 0;
{body}
}}
"""

STATIC = """\
  access_log off;
  default_type application/json;
  server {{ listen 127.0.0.1:{port}; root {dir}/www; }}
"""

PROXY = """\
  access_log {dir}/{name}-access.log;
  upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 600s;
    }}
  }}
"""

# What the static backend serves: small answers shaped like Ollama's.
FILES = {
    "api/version": b'{"version":"0.12.0"}\n',
    "api/tags": b'{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest"}]}\n',
}


def installed() -> str | None:
    """The nginx binary, if there is one (it is looked for, never installed)."""
    return shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(path, os.X_OK)),
        None,
    )


def static_config(workdir: str, name: str, port: int) -> str:
    for relative, content in FILES.items():
        path = os.path.join(workdir, "www", relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as out:
            out.write(content)
    return _write(workdir, name, STATIC.format(dir=workdir, port=port))


def proxy_config(workdir: str, name: str, port: int, backend: int) -> str:
    return _write(workdir, name, PROXY.format(dir=workdir, name=name, port=port, backend=backend))


def command(binary: str, workdir: str, config: str) -> list[str]:
    """nginx in the foreground, its error log in workdir from the start (-e)."""
    return [binary, "-p", workdir, "-e", os.path.join(workdir, "nginx-error.log"), "-c", config]


def _write(workdir: str, name: str, body: str) -> str:
    path = os.path.join(workdir, f"{name}.conf")
    with open(path, "w") as out:
        out.write(COMMON.format(dir=workdir, name=name, body=body))
    return path
