"""Certificates and keys for a federation on a network: TLS for the SuperLink, one authentication key per site.

``anomalib-diffusion-federated credentials --output certs --hosts server.example.com 10.0.0.5 --sites line4 line7``
writes (with the ``cryptography`` package, no ``openssl`` needed):

- ``ca.crt`` / ``ca.key``: a certificate authority of the federation's own. ``ca.crt`` goes to every
  site (``flower-supernode --root-certificates``) and to the machine that submits runs; ``ca.key``
  signs the server certificate and should then be stored offline.
- ``server.pem`` / ``server.key``: the SuperLink's TLS certificate (valid for ``--hosts``, plus
  ``localhost`` and ``127.0.0.1``) and its key; they stay on the server machine
  (``flower-superlink --ssl-certfile server.pem --ssl-keyfile server.key --ssl-ca-certfile ca.crt``).
- ``<site>.key`` / ``<site>.pub``: each site's authentication key pair (ECDSA P-384, OpenSSH format,
  as ``ssh-keygen -t ecdsa -b 384`` writes). The private key goes to that site only
  (``flower-supernode --auth-supernode-private-key``); the public key is registered with the
  SuperLink (``flwr supernode register``), which then refuses every node without a registered key.

Everything is written to a temporary folder first and moved into place at the end, so an interrupted
run leaves nothing half-written; an existing ``--output`` folder is never overwritten.
"""

import datetime as dt
import ipaddress
import os
import re
import shutil
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365
SITE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "anomalib-diffusion federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _subject_alternative_names(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _pem_key(key: ec.EllipticCurvePrivateKey, encoding: serialization.PrivateFormat) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, encoding, serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def make_credentials(output: Path | str, hosts: list[str], sites: list[str], valid_days: int = VALID_DAYS) -> Path:
    """Write the CA, the SuperLink's certificate for ``hosts`` and one key pair per site into ``output``."""
    output = Path(output)
    if output.exists():
        msg = f"{output} already exists; choose a new folder (existing keys are never overwritten)."
        raise FileExistsError(msg)
    if not sites:
        msg = "Name at least one site (--sites line4 line7 ...): each gets its own key pair."
        raise ValueError(msg)
    bad = [site for site in sites if not SITE_NAME.match(site)]
    if bad or len(set(sites)) != len(sites):
        msg = f"Site names must be unique and use letters, digits, '.', '_' or '-' only; got {sites}."
        raise ValueError(msg)
    now = dt.datetime.now(dt.UTC)
    validity = (now - dt.timedelta(minutes=5), now + dt.timedelta(days=valid_days))
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("anomalib-diffusion federation CA"))
        .issuer_name(_name("anomalib-diffusion federation CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0] if hosts else "localhost"))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(_subject_alternative_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        _write(staging / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))
        _write(staging / "ca.key", _pem_key(ca_key, serialization.PrivateFormat.PKCS8), private=True)
        _write(staging / "server.pem", server.public_bytes(serialization.Encoding.PEM))
        _write(staging / "server.key", _pem_key(server_key, serialization.PrivateFormat.PKCS8), private=True)
        for site in sites:
            key = ec.generate_private_key(ec.SECP384R1())
            _write(staging / f"{site}.key", _pem_key(key, serialization.PrivateFormat.OpenSSH), private=True)
            public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            _write(staging / f"{site}.pub", public + b"\n")
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output
