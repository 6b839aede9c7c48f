"""Enrolment of this host as a CYPHONIC node, and the agent's state directory.

``cyphonic-agent enroll --as URL --token T --state-dir D``:

    1. POST <AS>/v1/enrol/info {token}        -> the node's FQDN (the token stays unused)
    2. make an ECDSA P-256 key here; it never leaves this host
    3. POST <AS>/v1/enrol {token, CSR}        -> certificate chain, root CA, service CA,
                                                 AS endpoints
    4. check: the certificate is for our key and FQDN and chains to the root (and the root
       matches --root-ca-sha256 when given); the service CA is a CA the root issued
    5. write the state directory

``renew`` replaces key and certificate later, over the node's QUIC session with the AS.
Key and certificate are always replaced as a pair (``cyphonic.pki.write_identity``): a
crash midway leaves the previous or the new pair, which ``load_node_identity`` puts back
in place, never a key without its certificate.

State directory (read by ``cyphonic-agent up``)::

    node.key        private key, PKCS#8 PEM, 0600
    node.crt        node certificate then node CA, PEM
    root-ca.crt     the deployment's root CA, PEM
    service-ca.crt  the service CA (AS, NMS and TRS certificates), pinned; PEM
    agent.json      AgentState: fqdn, name, domain, as_url, as_endpoints, as_server_name,
                    serial, not_after, enrolled_at
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cyphonic.errors import (
    AlreadyExists,
    CyphonicError,
    InvalidArgument,
    MalformedMessage,
    PermissionDenied,
    Timeout,
    Unavailable,
    from_wire,
)
from cyphonic.pki import (
    CertifiedKey,
    TrustStore,
    atomic_write,
    fingerprint,
    generate_key,
    load_certificates,
    make_csr,
    recover_identity,
    verify_peer,
    write_certificates,
    write_identity,
)
from cyphonic.revocation import CrlRevocations, RevocationCache, crl_url
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire.messages import expect, wrap

NODE_KEY = "node.key"
NODE_CERT = "node.crt"
ROOT_CA = "root-ca.crt"
SERVICE_CA = "service-ca.crt"
AGENT_JSON = "agent.json"
STATE_VERSION = 1


@dataclass(frozen=True)
class AgentState:
    """What ``agent.json`` holds: who this node is and where its AS is."""

    fqdn: str
    name: str
    domain: str
    as_url: str
    as_endpoints: list[str]
    as_server_name: str
    serial: str
    not_after: str
    enrolled_at: str
    version: int = STATE_VERSION
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StatePaths:
    """The files of a state directory."""

    directory: Path

    @property
    def key(self) -> Path:
        """The node's private key."""
        return self.directory / NODE_KEY

    @property
    def cert(self) -> Path:
        """The node certificate chain."""
        return self.directory / NODE_CERT

    @property
    def root_ca(self) -> Path:
        """The root CA certificate."""
        return self.directory / ROOT_CA

    @property
    def service_ca(self) -> Path:
        """The service CA certificate (pinned at enrolment)."""
        return self.directory / SERVICE_CA

    @property
    def config(self) -> Path:
        """``agent.json``."""
        return self.directory / AGENT_JSON


def read_agent_state(state_dir: Path | str) -> AgentState:
    """Load ``agent.json`` from a state directory; ``InvalidArgument`` if missing or bad."""
    path = StatePaths(Path(state_dir)).config
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InvalidArgument(f"{path} is missing; run 'cyphonic-agent enroll' first") from exc
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"{path} is not readable JSON") from exc
    known = {f for f in AgentState.__dataclass_fields__ if f != "extra"}
    try:
        return AgentState(
            **{k: v for k, v in data.items() if k in known},
            extra={k: v for k, v in data.items() if k not in known},
        )
    except TypeError as exc:
        raise InvalidArgument(f"{path} lacks fields: {exc}") from exc


def _write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, text.encode(), mode=0o644)


def _error_from_response(response: httpx.Response) -> CyphonicError:
    # The AS answers {"error": {"code": "<code_name>", "message": "..."}}.
    try:
        body = response.json()["error"]
        code_name, message = str(body["code"]), str(body["message"])
        code = pb.ErrorCode.Value("ERROR_CODE_" + code_name.upper())
    except (ValueError, KeyError, TypeError):
        if response.status_code >= 500:
            return Unavailable(f"AS answered HTTP {response.status_code}")
        return MalformedMessage(f"AS answered HTTP {response.status_code} without a JSON error")
    return from_wire(pb.Error(code=code, message=message))


async def _post(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    try:
        response = await client.post(url, json=body)
    except httpx.TimeoutException as exc:
        raise Timeout(f"no answer from {url}") from exc
    except httpx.HTTPError as exc:
        raise Unavailable(f"cannot reach {url}: {type(exc).__name__}") from exc
    if response.status_code >= 400:
        raise _error_from_response(response)
    try:
        answer = response.json()
    except ValueError as exc:
        raise MalformedMessage(f"{url} did not answer JSON") from exc
    if not isinstance(answer, dict):
        raise MalformedMessage(f"{url} did not answer a JSON object")
    return answer


def is_plaintext_remote(as_url: str) -> bool:
    """Whether ``as_url`` sends the token unencrypted to another host (worth a warning)."""
    parts = urlsplit(as_url)
    if parts.scheme != "http":
        return False
    host = parts.hostname or ""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def _check_chain(
    chain: list[x509.Certificate],
    root: x509.Certificate,
    *,
    key_public: Any,
    fqdn: str,
    root_ca_sha256: str | None,
    now: datetime,
) -> None:
    if not chain:
        raise MalformedMessage("AS answered an empty certificate chain")
    if root_ca_sha256 is not None:
        wanted = root_ca_sha256.lower().replace(":", "")
        if fingerprint(root) != wanted:
            raise PermissionDenied(
                f"root CA fingerprint {fingerprint(root)} is not the expected {wanted}"
            )
    if chain[0].public_key() != key_public:
        raise PermissionDenied("the certificate is not for the key made here")
    if len(chain) < 2:
        raise MalformedMessage("AS answered no node CA certificate after the node certificate")
    # The node CA comes from the same answer; what proves it is the chain to the root.
    trust = TrustStore(root=root, node_ca=chain[1])
    verify_peer(chain, trust=trust, expect="node", expected_name=fqdn, now=now)


def _check_service_ca(
    service_ca: x509.Certificate,
    root: x509.Certificate,
    node_ca: x509.Certificate,
) -> None:
    # What makes it trustworthy is the root's signature: it arrived with the same answer.
    try:
        service_ca.verify_directly_issued_by(root)
        is_ca = service_ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound) as exc:
        raise PermissionDenied("the service CA is not a CA issued by the root") from exc
    if not is_ca or service_ca == node_ca:
        raise PermissionDenied("the service CA is not a CA of its own")


def _check_issued(
    answer: dict[str, Any],
    *,
    key_public: Any,
    fqdn: str,
    root_ca_sha256: str | None,
    now: datetime,
) -> tuple[list[x509.Certificate], x509.Certificate, x509.Certificate | None]:
    try:
        chain = x509.load_pem_x509_certificates(str(answer["certificate_chain_pem"]).encode())
        root = x509.load_pem_x509_certificate(str(answer["root_ca_pem"]).encode())
        service_pem = answer.get("service_ca_pem")
        service_ca = (
            x509.load_pem_x509_certificate(str(service_pem).encode()) if service_pem else None
        )
    except (KeyError, ValueError) as exc:
        raise MalformedMessage("AS answer lacks a usable certificate chain or root CA") from exc
    _check_chain(
        chain, root, key_public=key_public, fqdn=fqdn, root_ca_sha256=root_ca_sha256, now=now
    )
    if service_ca is not None:
        _check_service_ca(service_ca, root, chain[1])
    return chain, root, service_ca


async def enroll(
    *,
    as_url: str,
    token: str,
    state_dir: Path | str,
    verify: bool | str = True,
    root_ca_sha256: str | None = None,
    force: bool = False,
    request_timeout: float = 30.0,
    now: datetime | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AgentState:
    """Enrol this host with the AS at ``as_url`` using a one-time ``token``.

    Makes the key here, sends only the CSR, checks what comes back and writes the state
    directory. ``verify`` is httpx's TLS verification (True, False or a CA bundle path).
    Raises ``AlreadyExists`` if ``state_dir`` already holds a certificate (unless
    ``force``), the AS's typed errors (``TokenInvalid``, ``InvalidArgument``, ...),
    ``Unavailable``/``Timeout`` when the AS cannot be reached.
    """
    paths = StatePaths(Path(state_dir))
    if paths.cert.exists() and not force:
        raise AlreadyExists(
            f"{paths.directory} already holds a node certificate (use --force to enrol again)"
        )
    token = token.strip()
    if not token:
        raise InvalidArgument("the enrolment token is empty")
    base = as_url.rstrip("/")
    client = httpx.AsyncClient(timeout=request_timeout, verify=verify, transport=transport)
    async with client:
        info = await _post(client, f"{base}/v1/enrol/info", {"token": token})
        fqdn = str(info.get("fqdn", ""))
        if not fqdn:
            raise MalformedMessage("AS did not say which FQDN the token enrols")
        key = generate_key()
        csr = make_csr(key, fqdn)
        answer = await _post(
            client,
            f"{base}/v1/enrol",
            {
                "token": token,
                "csr_pem": csr.public_bytes(serialization.Encoding.PEM).decode(),
            },
        )
    now = now or datetime.now(UTC)
    chain, root, service_ca = _check_issued(
        answer, key_public=key.public_key(), fqdn=fqdn, root_ca_sha256=root_ca_sha256, now=now
    )
    state = AgentState(
        fqdn=fqdn,
        name=str(answer.get("name") or fqdn.split(".", 1)[0]),
        domain=str(answer.get("domain") or fqdn.split(".", 1)[1]),
        as_url=base,
        as_endpoints=[str(e) for e in answer.get("as_endpoints") or []],
        as_server_name=str(answer.get("as_server_name") or ""),
        serial=format(chain[0].serial_number, "x"),
        not_after=chain[0].not_valid_after_utc.isoformat(),
        enrolled_at=now.isoformat(),
    )
    paths.directory.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.directory, 0o700)
    write_certificates(paths.root_ca, [root])
    if service_ca is not None:
        write_certificates(paths.service_ca, [service_ca])
    else:  # an AS that does not name its service CA: nothing stale stays pinned
        paths.service_ca.unlink(missing_ok=True)
    write_identity(paths.cert, paths.key, key=key, certs=chain)
    _write_state(paths, state)
    return state


def _write_state(paths: StatePaths, state: AgentState) -> None:
    data = asdict(state)
    data.update(data.pop("extra"))
    _write_json(paths.config, data)


Requester = Callable[[pb.Envelope], Awaitable[pb.Envelope]]


async def renew(
    request: Requester, state_dir: Path | str, *, now: datetime | None = None
) -> AgentState:
    """Renew the node certificate over an AS signalling session (``session.request``).

    Makes a new key here, sends its CSR in a RenewRequest, checks the answer like an
    enrolment (our key, our FQDN, chains to the stored root) and replaces ``node.key``
    and ``node.crt``. The AS's refusals raise as their ``CyphonicError``; the old
    certificate stays valid until it expires, so a failed renewal can be retried.
    """
    paths = StatePaths(Path(state_dir))
    state = read_agent_state(paths.directory)
    root = load_certificates(paths.root_ca)[0]
    key = generate_key()
    csr = make_csr(key, state.fqdn)
    answer = await request(
        wrap(pb.RenewRequest(csr_der=csr.public_bytes(serialization.Encoding.DER)))
    )
    if answer.WhichOneof("body") == "error":
        raise from_wire(answer.error)
    response = expect(answer, pb.RenewResponse)
    try:
        chain = x509.load_pem_x509_certificates(response.certificate_chain_pem)
    except ValueError as exc:
        raise MalformedMessage("RenewResponse holds no PEM certificate chain") from exc
    now = now or datetime.now(UTC)
    _check_chain(
        chain, root, key_public=key.public_key(), fqdn=state.fqdn, root_ca_sha256=None, now=now
    )
    # As a pair: a crash midway leaves the old or the new pair (load_node_identity).
    write_identity(paths.cert, paths.key, key=key, certs=chain)
    renewed = replace(
        state,
        serial=format(chain[0].serial_number, "x"),
        not_after=chain[0].not_valid_after_utc.isoformat(),
    )
    _write_state(paths, renewed)
    return renewed


def load_node_identity(state_dir: Path | str) -> CertifiedKey:
    """The node's key and certificate chain, after finishing or undoing a renewal that was
    interrupted (``cyphonic.pki.recover_identity``); ``InvalidArgument`` if none is left."""
    paths = StatePaths(Path(state_dir))
    return recover_identity(paths.cert, paths.key)


def load_node_chain(state_dir: Path | str) -> list[x509.Certificate]:
    """The node certificate chain stored in a state directory."""
    return load_certificates(StatePaths(Path(state_dir)).cert)


def load_node_trust(
    state_dir: Path | str,
    *,
    is_revoked: Callable[[x509.Certificate], bool] | None = None,
) -> TrustStore:
    """What a node trusts: the root, the node CA (its own chain's) and, when enrolment
    stored it, the pinned service CA; ``is_revoked`` is ``node_revocation_cache(...)
    .is_revoked`` so that a peer node with a revoked certificate is refused."""
    paths = StatePaths(Path(state_dir))
    chain = load_certificates(paths.cert)
    service_ca = load_certificates(paths.service_ca)[0] if paths.service_ca.exists() else None
    return TrustStore(
        root=load_certificates(paths.root_ca)[0],
        node_ca=chain[1] if len(chain) > 1 else None,
        service_ca=service_ca,
        is_revoked=is_revoked,
    )


def node_revocation_cache(
    state_dir: Path | str,
    *,
    interval: float = 30.0,
    verify: bool | str = True,
    transport: httpx.AsyncBaseTransport | None = None,
) -> RevocationCache:
    """The revocation cache of a node: the AS's CRL (``<as_url>/v1/crl`` from agent.json),
    accepted only when signed by the node CA; refreshed every ``interval`` seconds.

    ``cyphonic-agent up`` uses it like this::

        cache = node_revocation_cache(state_dir)
        await cache.start()                       # an unreachable AS is logged, retried
        trust = load_node_trust(state_dir, is_revoked=cache.is_revoked)
        endpoint = await QuicEndpoint.open(..., trust=trust)
        cache.subscribe(close_revoked_on(endpoint, cache))   # ends live tunnels too
        ...
        await cache.close()
    """
    state = read_agent_state(state_dir)
    chain = load_node_chain(state_dir)
    if len(chain) < 2:
        raise InvalidArgument(f"{StatePaths(Path(state_dir)).cert} lacks the node CA")
    node_ca = chain[1]
    return RevocationCache(
        CrlRevocations(crl_url(state.as_url), node_ca=node_ca, verify=verify, transport=transport),
        issuer=node_ca,
        interval=interval,
    )
