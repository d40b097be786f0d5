"""Certificates and node keys for a deployment: `fedir certs init`, `certs server` and `certs node`.

The SuperLink speaks TLS, so the coordinator needs a certificate authority (CA) and a
server certificate naming every host name or address the hospitals will dial (a name
missing from the subject alternative names fails the TLS handshake at the hospital).
Flower's registered-node authentication (`--enable-supernode-auth`) identifies each
SuperNode by an elliptic-curve key pair in OpenSSH format: the hospital keeps the private
key, the coordinator registers the public key with `flwr supernode register`.

Private keys are written with mode 0600 and nothing is ever overwritten without
`force`: regenerating a CA silently would lock every hospital out, and regenerating a node
key would make the registered public key useless.

Layout of DIR:
    ca.crt                    the CA's certificate (goes to every hospital)
    ca-private/ca.key         the CA's key, in a folder of its own (0700): nginx and the
                              SuperLink are given DIR's other files and never need it;
                              move it offline when no certificate is being issued
    server.crt, server.key    the SuperLink's certificate and key
    nodes/SITE.key, SITE.pub  a SuperNode's key pair (SITE.pub goes to the coordinator)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedir.errors import UserError

CA_DAYS = 3650
SERVER_DAYS = 825  # the longest lifetime TLS clients commonly accept for a leaf certificate


CA_KEY = Path("ca-private") / "ca.key"
LEGACY_CA_KEY = Path("ca.key")  # where fedir wrote it before: beside what nginx reads


class CertsError(UserError, ValueError):
    """A file would be overwritten, or an input is unusable."""


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise CertsError(f"refusing to overwrite {', '.join(existing)} (use --force to replace)")


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write `data`; a private file is created 0600 from the start (no window at 0644)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent.name == CA_KEY.parent.name:
        os.chmod(path.parent, 0o700)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600 if private else 0o644)  # whatever the umask was


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedir"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def init_ca(directory: str | Path, hosts: Sequence[str], force: bool = False) -> dict[str, Path]:
    """Write a CA and the SuperLink's server certificate for `hosts` (names or IPs)."""
    if not hosts:
        raise CertsError("give at least one --host: the name or address the sites will connect to")
    out = Path(directory)
    _refuse_existing([out / name for name in ("ca.crt", CA_KEY, LEGACY_CA_KEY, "server.crt", "server.key")], force)
    now = _now()
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("fedir study CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    (out / LEGACY_CA_KEY).unlink(missing_ok=True)  # --force over an older layout
    _write(out / CA_KEY, _pem_key(ca_key), private=True)
    _write(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return {"ca.crt": out / "ca.crt", "ca.key": out / CA_KEY,
            **issue_server_cert(out, hosts, force=True)}


def issue_server_cert(directory: str | Path, hosts: Sequence[str], force: bool = False,
                      ca_key_path: str | Path | None = None) -> dict[str, Path]:
    """(Re-)issue the SuperLink's certificate for `hosts` from the CA already in DIR.

    The CA is kept, so every hospital's `ca.crt` stays valid: this is how a front door's
    address is added to the names, or an expiring certificate renewed, without breaking
    any node's trust (re-running `init --force` would make a new CA). The CA's key is read
    from `ca_key_path` (where it was moved offline), else DIR/ca-private/ca.key.
    """
    if not hosts:
        raise CertsError("give at least one --host: the name or address the sites will connect to")
    out = Path(directory)
    key_path = Path(ca_key_path) if ca_key_path is not None else out / CA_KEY
    if ca_key_path is None and not key_path.exists() and (out / LEGACY_CA_KEY).exists():
        raise CertsError(f"{out / LEGACY_CA_KEY} sits beside the files nginx and the SuperLink read: move it with "
                         f"`mkdir -m 700 {out / CA_KEY.parent} && mv {out / LEGACY_CA_KEY} {key_path}`, then re-run")
    try:
        ca_cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
        ca_key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise CertsError(f"no usable CA ({out / 'ca.crt'}, {key_path}): {exc}; run `fedir certs init` first, "
                         "or give the CA's key with --ca-key") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CertsError(f"{key_path} is not the elliptic-curve key `fedir certs init` writes")
    paths = {name: out / name for name in ("server.crt", "server.key")}
    _refuse_existing(list(paths.values()), force)
    now = _now()
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(paths["server.key"], _pem_key(server_key), private=True)
    _write(paths["server.crt"], server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return paths


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate clock skew


def node_keys(directory: str | Path, site: str, force: bool = False) -> dict[str, Path]:
    """Write SITE's SuperNode key pair (OpenSSH-format EC P-384, as Flower's node auth reads)."""
    if not site or "/" in site or site.startswith("."):
        raise CertsError(f"site name {site!r} cannot be a file name")
    nodes = Path(directory) / "nodes"
    paths = {"private": nodes / f"{site}.key", "public": nodes / f"{site}.pub"}
    _refuse_existing(list(paths.values()), force)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(paths["private"], private, private=True)
    _write(paths["public"], public + f" fedir-{site}\n".encode(), private=False)
    return paths
