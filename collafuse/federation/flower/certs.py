"""Local TLS certificates for a SuperLink and EC key pairs for SuperNode authentication."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Certificates:
    """Paths written by `make_certificates`."""

    ca_cert: Path  # give to every SuperNode (--root-certificates) and to the flwr CLI
    ca_key: Path  # keep private: only needed to sign more server certificates
    server_cert: Path  # SuperLink --ssl-certfile
    server_key: Path  # SuperLink --ssl-keyfile
    node_private_keys: tuple[Path, ...]  # SuperNode k: --auth-supernode-private-key
    node_public_keys: tuple[Path, ...]  # register with `flwr supernode register`
    client_keys: Path  # the ServerApp's `client-keys`: which node key speaks for which client


def make_certificates(
    out_dir: str | Path,
    *,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
    n_nodes: int,
    valid_days: int = 365,
) -> Certificates:
    """Write a local CA, a SuperLink server certificate for `hosts` and one EC key pair per SuperNode."""
    if n_nodes < 0:
        raise ValueError(f"n_nodes must be >= 0, got {n_nodes}; pass the number of SuperNodes (clients).")
    if not hosts:
        raise ValueError("hosts is empty; pass the names/IPs the SuperNodes use to reach the SuperLink.")
    if valid_days < 1:
        raise ValueError(f"valid_days must be >= 1, got {valid_days}.")
    out = Path(out_dir)
    (out / "nodes").mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    # Backdate a little so a SuperNode whose clock lags does not reject a fresh certificate.
    not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "collafuse local CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    paths = Certificates(
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        server_cert=out / "server.pem",
        server_key=out / "server.key",
        node_private_keys=tuple(out / "nodes" / f"node-{k}.key" for k in range(n_nodes)),
        node_public_keys=tuple(out / "nodes" / f"node-{k}.pub" for k in range(n_nodes)),
        client_keys=out / CLIENT_KEYS,
    )
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths.ca_key, _pem_key(ca_key))
    paths.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths.server_key, _pem_key(server_key))
    for private_path, public_path in zip(paths.node_private_keys, paths.node_public_keys):
        # Flower 1.42 reads SuperNode keys in OpenSSH format and accepts NIST curves; P-384 is its example.
        node_key = ec.generate_private_key(ec.SECP384R1())
        _write_private(
            private_path,
            node_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
        )
        public_path.write_bytes(
            node_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        )
    # Node k's key speaks for client k, and for no other: the server binds identities by key, not by claim.
    paths.client_keys.write_text(json.dumps(
        {key_fingerprint(p.read_bytes()): k for k, p in enumerate(paths.node_public_keys)}, indent=1))
    return paths


CLIENT_KEYS = "clients.json"


def key_fingerprint(public_key: bytes) -> str:
    """SHA-256 of a public key's DER SubjectPublicKeyInfo, whichever encoding it comes in (OpenSSH, PEM, DER)."""
    loaders = (serialization.load_ssh_public_key, serialization.load_pem_public_key,
               serialization.load_der_public_key)
    for load in loaders:
        try:
            key = load(bytes(public_key))
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
        der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(der).hexdigest()
    raise ValueError("not a public key in OpenSSH, PEM or DER encoding")


def load_client_keys(path: str | Path) -> dict[str, int]:
    """The `client-keys` file `make_certificates` wrote: key fingerprint -> client id."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"client-keys {path} not found; `collafuse flower certs` writes it as "
                                f"<certs>/{CLIENT_KEYS}")
    keys = json.loads(path.read_text())
    if not isinstance(keys, dict) or not all(isinstance(k, str) and type(v) is int and v >= 0
                                             for k, v in keys.items()):
        raise ValueError(f"{path}: expected {{\"<key fingerprint>\": <client id>, ...}}")
    return keys


def registration_help(certs: Certificates, *, superlink_address: str = "<superlink-host>:8000") -> str:
    """Text telling an operator how to start a SuperLink, register node keys and start SuperNodes."""
    lines = [
        "1. On the SuperLink machine:",
        f"   flower-superlink --ssl-ca-certfile {certs.ca_cert} --ssl-certfile {certs.server_cert} \\",
        f"     --ssl-keyfile {certs.server_key} --enable-supernode-auth \\",
        "     --disable-runtime-dependency-installation --host 0.0.0.0 --port 8000",
        "2. Add a connection to $FLWR_HOME/config.toml (default ~/.flwr/config.toml) where you run `flwr`:",
        "   [superlink.collafuse]",
        f'   address = "{superlink_address}"',
        f'   root-certificates = "{certs.ca_cert.resolve()}"',
        "3. Register each SuperNode's public key (the SuperLink refuses unregistered nodes):",
    ]
    lines += [f"   flwr supernode register {pub} collafuse" for pub in certs.node_public_keys]
    lines += [
        "4. On client machine k, with ca.crt and only its own node-k.key copied over:",
        f"   flower-supernode --superlink {superlink_address} --root-certificates ca.crt \\",
        "     --auth-supernode-private-key node-k.key --node-config \"data-path='/data/client-k' client-id=k\"",
    ]
    return "\n".join(lines)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    # Create with 0600 from the start so the key is never world-readable, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_TRUNC
