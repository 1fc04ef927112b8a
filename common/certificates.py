"""A local certificate authority, TLS server certificates and SuperNode key pairs.

Why: Flower's SuperLink serves HTTPS, SuperNode authentication only works over TLS,
and a deployment on a few lab machines has no company PKI to ask. These functions
make what Flower 1.41 reads, with the `cryptography` package (a Flower dependency):

- `make_ca`: `ca.crt` + `ca.key`, a self-signed CA (EC P-256). Clients trust `ca.crt`
  (`flower-supernode --root-certificates`, `root-certificates` of a `flwr` connection,
  `grpc.ssl_channel_credentials(root_certificates=...)`).
- `make_server_cert`: `fairedge.server.crt` + `fairedge.server.key` signed by the CA, valid for
  `localhost`, `127.0.0.1`, `::1` and the given host names / IP addresses (SAN).
- `make_node_key`: a SuperNode authentication key pair in OpenSSH format, EC P-384 (what
  `ssh-keygen -t ecdsa -b 384` writes and what `flower-supernode
  --auth-supernode-private-key` and `flwr supernode register <key.pub>` accept).

Private keys are written unencrypted with mode 0600 and never overwrite a file.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
_HOSTNAME = re.compile(
    r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA's certificate and private key files."""

    cert_path: Path
    key_path: Path

    def load(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """The CA certificate and its private key."""
        cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{self.key_path}: not an EC private key")
        return cert, key


@dataclass(frozen=True)
class ServerCertificate:
    """A server's certificate (signed by a CA) and private key files, and the names it is valid for."""

    cert_path: Path
    key_path: Path
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode authentication key pair: OpenSSH private key and `<name>.pub`."""

    private_path: Path
    public_path: Path


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to a new file readable by its owner only (0600); refuse to overwrite."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    if days < 1:
        raise ValueError(f"days={days}: a certificate must be valid for at least 1 day")
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)  # small slack for clock skew


def _san_entry(host: str) -> x509.GeneralName:
    """An IP address or DNS name for the subject alternative name extension."""
    host = host.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    if not _HOSTNAME.match(host) or len(host) > 253:
        raise ValueError(f"host {host!r} is neither an IP address nor a valid DNS name")
    return x509.DNSName(host.lower())


def make_ca(directory: str | Path, *, common_name: str = "fairedge local CA", days: int = 3650) -> CertificateAuthority:
    """Create `directory/ca.crt` and `directory/ca.key` (0600): a self-signed CA."""
    directory = Path(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    ca = CertificateAuthority(directory / "ca.crt", directory / "ca.key")
    write_private(ca.key_path, _pem_key(key))
    _write_public(ca.cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return ca


def make_server_cert(
    directory: str | Path,
    ca: CertificateAuthority,
    hosts: Iterable[str] = (),
    *,
    name: str = "server",
    days: int = 825,
) -> ServerCertificate:
    """Create `directory/<name>.crt` and `<name>.key` (0600), signed by `ca`.

    Valid for localhost, 127.0.0.1, ::1 and `hosts` (DNS names or IP addresses): the
    names clients use to reach the server must all be listed, or TLS verification fails.
    """
    all_hosts = tuple(dict.fromkeys([*DEFAULT_HOSTS, *(h.strip() for h in hosts if h.strip())]))
    san = [_san_entry(h) for h in all_hosts]
    common_name = all_hosts[len(DEFAULT_HOSTS)] if len(all_hosts) > len(DEFAULT_HOSTS) else "localhost"
    ca_cert, ca_key = ca.load()
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_after, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory = Path(directory)
    server = ServerCertificate(directory / f"{name}.crt", directory / f"{name}.key", all_hosts)
    write_private(server.key_path, _pem_key(key))
    _write_public(server.cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return server


def make_node_key(path: str | Path, *, comment: str = "") -> NodeKey:
    """Create a SuperNode key pair: `path` (OpenSSH private key, 0600) and `path.pub`.

    EC P-384, like `ssh-keygen -t ecdsa -b 384 -N "" -f path`. Register the public
    key with `flwr supernode register path.pub <connection>`; start the SuperNode
    with `--auth-supernode-private-key path`.
    """
    path = Path(path)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    node = NodeKey(path, path.with_name(path.name + ".pub"))
    write_private(node.private_path, private)
    _write_public(node.public_path, public + (f" {comment}".encode() if comment else b"") + b"\n")
    return node


@dataclass(frozen=True)
class Credentials:
    """Everything a deployment needs: CA, server certificate, one key pair per SuperNode."""

    ca: CertificateAuthority
    server: ServerCertificate
    nodes: list[NodeKey]


def make_credentials(directory: str | Path, *, hosts: Iterable[str] = (), nodes: int = 0) -> Credentials:
    """`directory/ca.{crt,key}`, `server.{crt,key}` and `node-keys/node-<i>{,.pub}` for i < nodes."""
    if nodes < 0:
        raise ValueError(f"nodes={nodes}: must be 0 or more")
    hosts = [h for h in hosts if h.strip()]
    for host in hosts:
        _san_entry(host)  # fail on a bad name before anything is written
    directory = Path(directory)
    existing = [p for p in ("ca.crt", "ca.key", "server.crt", "server.key", "node-keys") if (directory / p).exists()]
    if existing:
        raise FileExistsError(
            f"{directory} already holds {', '.join(existing)}; choose an empty folder "
            "(credentials are never overwritten)"
        )
    ca = make_ca(directory)
    server = make_server_cert(directory, ca, hosts)
    keys = [make_node_key(directory / "node-keys" / f"node-{i}", comment=f"fairedge-node-{i}") for i in range(nodes)]
    return Credentials(ca, server, keys)
