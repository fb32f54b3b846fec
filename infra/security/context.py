"""The client context file (kubectl-style): where a cluster is and which credentials reach it.

``llmctl`` and the client library read it when no endpoint or TLS flags are given, so a user who ran ``llumnix serve``
(which writes it) needs no flags. Location: ``$LLUMNIX_CONTEXT`` if set, else ``$XDG_CONFIG_HOME/llumnix/context.yaml``
(``~/.config/llumnix/context.yaml``). It holds an API key and names a private key, so it is written with mode 0600,
and reading refuses a file that others may read (as ssh does with keys) instead of silently using leaked secrets.

```yaml
current-context: llumnix
contexts:
- name: llumnix
  cluster: llumnix
  scheduler: [127.0.0.1:50060, 127.0.0.1:50061]
  frontend: [127.0.0.1:50051]
  http: https://127.0.0.1:8000
  etcd: [127.0.0.1:2379]
  ca: /home/me/.local/state/llumnix/pki/ca.pem        # paths relative to the file's folder are allowed
  cert: /home/me/.local/state/llumnix/pki/admin-admin.pem
  key: /home/me/.local/state/llumnix/pki/admin-admin-key.pem
  api_key: llx_...
```
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from cryptography import x509

from pyllumnix.infra.security.ca import CertPaths, identities_in

ENV_VAR = "LLUMNIX_CONTEXT"


class ContextError(Exception):
    """A context file that cannot be used (unreadable, malformed, unknown context, too open permissions)."""


def context_path(env: Mapping[str, str] | None = None) -> Path:
    """Where the context file is (whether or not it exists)."""
    env = os.environ if env is None else env
    if env.get(ENV_VAR):
        return Path(env[ENV_VAR]).expanduser()
    base = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "llumnix" / "context.yaml"


def _str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ContextError(f"{what} must be a list of host:port strings")


@dataclass
class ClientContext:
    """One named context: endpoints plus credentials (every field optional but the name)."""

    name: str
    cluster: str = ""
    scheduler: list[str] = field(default_factory=list)
    frontend: list[str] = field(default_factory=list)
    http: str = ""
    etcd: list[str] = field(default_factory=list)
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    api_key: str = field(default="", repr=False)  # a secret: kept out of logs and tracebacks
    server_name: str = ""

    def cert_paths(self) -> CertPaths | None:
        """The mutual-TLS files, when the context has a CA, a certificate and a key."""
        if self.ca and self.cert and self.key:
            return CertPaths(self.ca, self.cert, self.key)
        return None

    def checks_role_names(self) -> bool:
        """Whether clients of this context check their servers' role names (``<role>.llumnix.invalid``) instead of
        their hosts: only a context of a cluster's own CA, which its client certificate proves (a ``llumnix://``
        identity: ``llumnix serve``'s admin), and naming no server. A hand-written one for a load balancer with a
        public or company certificate (an API key, no client certificate) keeps the host check."""
        if self.ca is None or self.cert is None or self.server_name:
            return False
        try:
            return bool(identities_in(x509.load_pem_x509_certificate(self.cert.read_bytes())))
        except (OSError, ValueError):
            return False

    def tls_files(self) -> dict[str, Any]:
        """Keyword arguments for ``clients.TlsConfig.from_files`` (empty when the context has no CA: plaintext)."""
        if self.ca is None:
            return {}
        return {"ca": self.ca, "cert": self.cert, "key": self.key, "server_name": self.server_name or None}

    def channel_credentials(self) -> Any:
        """grpc channel credentials for this context: TLS with the context's CA (and client certificate), plus its API
        key as ``authorization: Bearer …`` on every call (grpc sends call credentials only over TLS). None when the
        context has no CA (plaintext: pass :meth:`grpc_metadata` per call instead)."""
        if self.ca is None:
            return None
        ssl_creds = grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )
        if not self.api_key:
            return ssl_creds
        return grpc.composite_channel_credentials(ssl_creds, grpc.access_token_call_credentials(self.api_key))

    def grpc_metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying the API key (``authorization: Bearer …``), empty without one."""
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    def http_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for key in ("cluster", "http", "api_key", "server_name"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        for key in ("scheduler", "frontend", "etcd"):
            if getattr(self, key):
                out[key] = list(getattr(self, key))
        for key in ("ca", "cert", "key"):
            if getattr(self, key) is not None:
                out[key] = str(getattr(self, key))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: Path) -> ClientContext:
        if not isinstance(data.get("name"), str) or not data["name"]:
            raise ContextError("every context needs a name")
        known = {"name", "cluster", "scheduler", "frontend", "http", "etcd", "ca", "cert", "key", "api_key"}
        unknown = set(data) - known - {"server_name"}
        if unknown:
            raise ContextError(f"context {data['name']!r}: unknown keys {', '.join(sorted(unknown))}")

        def path(key: str) -> Path | None:
            value = data.get(key)
            if value is None:
                return None
            p = Path(str(value)).expanduser()
            return p if p.is_absolute() else base / p

        ctx = cls(
            name=data["name"],
            cluster=str(data.get("cluster", "")),
            scheduler=_str_list(data.get("scheduler"), "scheduler"),
            frontend=_str_list(data.get("frontend"), "frontend"),
            http=str(data.get("http", "")),
            etcd=_str_list(data.get("etcd"), "etcd"),
            ca=path("ca"),
            cert=path("cert"),
            key=path("key"),
            api_key=str(data.get("api_key", "")),
            server_name=str(data.get("server_name", "")),
        )
        if (ctx.cert is None) != (ctx.key is None):
            raise ContextError(f"context {ctx.name!r}: cert and key must be given together")
        return ctx


def _read(path: Path) -> dict[str, Any]:
    """The file's mapping. The mode is checked before the content is read, so a file others may read is refused
    whatever it holds; a file that is not UTF-8 text is a ContextError like any other unusable file (not a traceback).
    """
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ContextError(f"cannot read the context file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ContextError(
            f"the context file {path} is accessible by others (mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ContextError(f"cannot read the context file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ContextError(
            f"the context file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"
        ) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ContextError(f"the context file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("contexts", []), list):
        raise ContextError(f"the context file {path} must map 'contexts' to a list")
    return data


def load_context(path: str | Path | None = None, name: str | None = None) -> ClientContext | None:
    """The named (else the current) context; None when the file does not exist. ContextError when unusable."""
    p = Path(path) if path is not None else context_path()
    if not p.exists():
        return None
    data = _read(p)
    contexts = [ClientContext.from_dict(c, p.parent) for c in data.get("contexts", [])]
    wanted = name or data.get("current-context")
    if wanted is None:
        if len(contexts) == 1:
            return contexts[0]
        raise ContextError(f"{p}: no current-context and {len(contexts)} contexts; name one")
    for ctx in contexts:
        if ctx.name == wanted:
            return ctx
    raise ContextError(f"{p}: no context named {wanted!r} (have: {', '.join(c.name for c in contexts) or 'none'})")


def save_context(ctx: ClientContext, path: str | Path | None = None, *, make_current: bool = True) -> Path:
    """Adds or replaces ``ctx`` in the file (other contexts kept), mode 0600, written atomically."""
    p = Path(path) if path is not None else context_path()
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = _read(p) if p.exists() else {}
    contexts = [c for c in data.get("contexts", []) if isinstance(c, dict) and c.get("name") != ctx.name]
    contexts.append(ctx.to_dict())
    data["contexts"] = contexts
    if make_current or "current-context" not in data:
        data["current-context"] = ctx.name
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, yaml.safe_dump(data, sort_keys=False).encode())
    finally:
        os.close(fd)
    os.replace(tmp, p)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m pyllumnix.infra.security.context [api-key|path|show]``: what ``llumnix serve`` wrote, for scripts
    (``export OPENAI_API_KEY=$(python -m pyllumnix.infra.security.context api-key)``)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    what = args[0] if args else "show"
    if what == "path":
        print(context_path())
        return 0
    try:
        ctx = load_context()
    except ContextError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if ctx is None:
        print(f"error: no context file at {context_path()} (run `llumnix serve` first)", file=sys.stderr)
        return 1
    if what == "api-key":
        if not ctx.api_key:
            print(f"error: context {ctx.name!r} has no API key", file=sys.stderr)
            return 1
        print(ctx.api_key)
        return 0
    if what == "show":
        shown = ctx.to_dict()
        if shown.get("api_key"):
            shown["api_key"] = shown["api_key"][:24] + "…"
        print(yaml.safe_dump(shown, sort_keys=False), end="")
        return 0
    print(f"error: unknown command {what!r} (api-key, path, show)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
