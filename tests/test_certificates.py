"""Local CA, server certificate and SuperNode keys: valid TLS for the listed names, keys Flower accepts."""

import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key

from fairedge.common.certificates import make_ca, make_credentials, make_node_key, make_server_cert
from fairedge.server.cli import main as server_cli


def _handshake(creds, server_hostname: str, cafile) -> None:
    """A TLS handshake between a server using `creds.server` and a client trusting `cafile`."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(creds.server.cert_path, creds.server.key_path)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                tls.sendall(b"x")
    finally:
        thread.join(timeout=10)
        listener.close()


def test_server_certificate_verifies_for_listed_names_only(tmp_path):
    creds = make_credentials(tmp_path, hosts=["edge-server.lan", "10.1.2.3"], nodes=0)
    for name in ("localhost", "127.0.0.1", "edge-server.lan", "10.1.2.3"):
        _handshake(creds, name, creds.ca.cert_path)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(creds, "other-host.lan", creds.ca.cert_path)  # not in the SAN
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(creds, "localhost", None)  # the system CAs do not know our CA
    cert = x509.load_pem_x509_certificate(creds.server.cert_path.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(creds.ca.cert_path.read_bytes()))


def test_private_keys_are_owner_only_and_never_overwritten(tmp_path):
    creds = make_credentials(tmp_path / "c", nodes=2)
    for path in (creds.ca.key_path, creds.server.key_path, *(n.private_path for n in creds.nodes)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    before = creds.ca.key_path.read_bytes()
    with pytest.raises(FileExistsError, match="never overwritten"):
        make_credentials(tmp_path / "c", nodes=1)
    with pytest.raises(FileExistsError):
        make_ca(tmp_path / "c")
    assert creds.ca.key_path.read_bytes() == before


def test_node_keys_are_what_flower_reads(tmp_path):
    node = make_node_key(tmp_path / "node-0", comment="fairedge-node-0")
    assert node.public_path.name == "node-0.pub"
    private = load_ssh_private_key(node.private_path.read_bytes(), None)  # as flower-supernode loads it
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert try_load_public_key(node.public_path)  # as `flwr supernode register` loads it


def test_bad_host_fails_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="not a host"):
        make_credentials(tmp_path / "c", hosts=["not a host"])
    assert not (tmp_path / "c").exists()
    ca = make_ca(tmp_path / "ca")
    with pytest.raises(ValueError, match="bad_name"):
        make_server_cert(tmp_path / "s", ca, ["bad_name"])


def test_certs_command(tmp_path, capsys):
    assert server_cli(["certs", "--out", str(tmp_path / "c"), "--hosts", "a.example,10.0.0.7", "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "a.example" in out and "node-1.pub" in out
    assert sorted(p.name for p in (tmp_path / "c" / "node-keys").iterdir()) == [
        "node-0",
        "node-0.pub",
        "node-1",
        "node-1.pub",
    ]
    assert server_cli(["certs", "--out", str(tmp_path / "c")]) == 2  # refuses to overwrite
    assert "already holds" in capsys.readouterr().err
