#!/usr/bin/env python3
"""Test credentials for a TLS + authenticated Flower deployment (NOT for production use).

Writes into OUT (default ./certificates):
  ca.crt, ca.key          a self-signed test CA (clients trust ca.crt)
  server.pem, server.key  the SuperLink's certificate, signed by the CA, valid for --host names
  node-<i>, node-<i>.pub  one ECDSA P-384 key pair per SuperNode, OpenSSH format (what
                          `flower-supernode --auth-supernode-private-key` and
                          `flwr supernode register` read)

Usage: python scripts/make_test_certs.py [OUT] [--nodes 3] [--host localhost --host 127.0.0.1]
Needs only the `cryptography` package (a Flower dependency).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 30


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _builder(subject: str, issuer: str, public_key) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca(out: Path) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        _builder("fedamole test CA", "fedamole test CA", key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write_key(out / "ca.key", key)
    (out / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def make_server_cert(
    out: Path, ca_key: rsa.RSAPrivateKey, ca_cert: x509.Certificate, hosts: list[str]
) -> None:
    """The SuperLink's certificate; TLS clients check the address they dial against its SANs."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        _builder(hosts[0], "fedamole test CA", key.public_key())
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    assert cert.issuer == ca_cert.subject
    _write_key(out / "server.key", key)
    (out / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_node_keys(out: Path, index: int) -> None:
    """A SuperNode's identity: Flower accepts NIST EC keys in OpenSSH format."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = out / f"node-{index}"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    (out / f"node-{index}.pub").write_bytes(public + f" node-{index}\n".encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=Path("certificates"))
    parser.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs to create")
    parser.add_argument(
        "--host",
        action="append",
        help="name or IP the SuperNodes/CLI dial (repeatable; default localhost and 127.0.0.1)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca(args.out)
    make_server_cert(args.out, ca_key, ca_cert, args.host or ["localhost", "127.0.0.1"])
    for index in range(args.nodes):
        make_node_keys(args.out, index)
    print(f"test CA, SuperLink certificate and {args.nodes} SuperNode key pairs in {args.out}/")


if __name__ == "__main__":
    main()
