#!/usr/bin/env python
"""Make the TLS files of a Flower deployment (and, on request, SuperNode authentication keys).

    python scripts/make_certs.py certs                        # SAN: 127.0.0.1, localhost
    python scripts/make_certs.py certs 10.0.0.5 superlink.example.org --node-keys 3

writes into the folder (created, files replaced):

    ca.crt, ca.key          a self-signed CA (keep ca.key offline; ca.crt goes to every SuperNode and flwr CLI)
    server.pem, server.key  the SuperLink's certificate, signed by the CA, with a subjectAltName for every
                            address given (IP addresses as IP SANs, names as DNS SANs): a SuperNode or the flwr
                            CLI only accepts the SuperLink under an address listed here
    node-<i>, node-<i>.pub  (--node-keys N) SuperNode authentication keys: ECDSA on NIST P-384 in OpenSSH
                            format, what ``flower-supernode --auth-supernode-private-key`` and
                            ``flwr supernode register`` read (same as ``ssh-keygen -t ecdsa -b 384 -N ""``)

SuperLink:  flower-superlink --ssl-ca-certfile certs/ca.crt --ssl-certfile certs/server.pem
                             --ssl-keyfile certs/server.key ...
SuperNode:  flower-supernode --root-certificates certs/ca.crt --superlink <address in the SAN>:9092 ...
flwr CLI:   root-certificates = "/absolute/path/certs/ca.crt" in the [superlink.<name>] connection

Uses ``cryptography`` (a dependency of flwr), so it runs wherever Flower is installed; no openssl needed.
Private keys are written with mode 0600.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS = ("127.0.0.1", "localhost")


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write `data` to `path` through a temporary file and a rename (a crash never leaves half a key)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_certs(out: str | Path, sans: list[str] | tuple[str, ...] = DEFAULT_SANS, days: int = 365) -> dict[str, Path]:
    """Write ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key`` into `out` (server certificate with a SAN per
    entry of `sans`); returns their paths by name."""
    if not sans:
        raise ValueError("give at least one server address for the certificate's subjectAltName")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)  # 5 min of clock skew

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hf_atm Flower deployment CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA384()))

    key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
              .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(start).not_valid_after(end)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(_san(list(sans)), critical=False)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA384()))

    paths = {n: out / n for n in ("ca.crt", "ca.key", "server.pem", "server.key")}
    _write(paths["ca.key"], _pem_key(ca_key), private=True)
    _write(paths["ca.crt"], ca.public_bytes(serialization.Encoding.PEM))
    _write(paths["server.key"], _pem_key(key), private=True)
    _write(paths["server.pem"], server.public_bytes(serialization.Encoding.PEM))
    return paths


def make_node_key(out: str | Path, name: str) -> tuple[Path, Path]:
    """Write a SuperNode authentication key pair ``<name>`` (private, OpenSSH) and ``<name>.pub`` into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    priv_path, pub_path = out / name, out / f"{name}.pub"
    _write(priv_path, private, private=True)
    _write(pub_path, public + f" {name}\n".encode())
    return priv_path, pub_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to write into")
    parser.add_argument("sans", nargs="*", help=f"server addresses for the SAN (default: {' '.join(DEFAULT_SANS)})")
    parser.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    parser.add_argument("--node-keys", type=int, default=0, metavar="N", help="also write N SuperNode key pairs")
    args = parser.parse_args(argv)
    if args.days < 1 or args.node_keys < 0:
        parser.error("--days must be >= 1 and --node-keys >= 0")
    paths = make_certs(args.out, args.sans or DEFAULT_SANS, args.days)
    for i in range(1, args.node_keys + 1):
        paths.update(zip((f"node-{i}", f"node-{i}.pub"), make_node_key(args.out, f"node-{i}")))
    for name, path in paths.items():
        print(f"{name:12s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
