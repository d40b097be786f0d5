"""`fedir certs`: a CA, a server certificate with the given names, node keys Flower reads;
private keys 0600; nothing overwritten without --force."""

import ipaddress
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from cryptography.hazmat.primitives.serialization.ssh import load_ssh_public_key
from flwr.cli.supernode.register import try_load_public_key

from fedir.cli import main


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_a_ca_and_a_server_cert_for_every_host(tmp_path, capsys):
    assert main(["certs", "init", str(tmp_path), "--host", "localhost", "--host", "127.0.0.1"]) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in ("ca-private/ca.key", "server.key"):
        assert _mode(tmp_path / key) == 0o600
    # the CA's key is in a folder of its own, which only its owner may enter
    assert not (tmp_path / "ca.key").exists() and _mode(tmp_path / "ca-private") == 0o700
    # the chain loads as a TLS server context would load it
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    ctx.load_verify_locations(tmp_path / "ca.crt")


def test_nothing_is_overwritten_without_force(tmp_path, capsys):
    assert main(["certs", "init", str(tmp_path), "--host", "localhost"]) == 0
    before = (tmp_path / "ca-private" / "ca.key").read_bytes()
    assert main(["certs", "init", str(tmp_path), "--host", "localhost"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "ca-private" / "ca.key").read_bytes() == before
    assert main(["certs", "init", str(tmp_path), "--host", "localhost", "--force"]) == 0
    assert (tmp_path / "ca-private" / "ca.key").read_bytes() != before

    assert main(["certs", "node", str(tmp_path), "site-0"]) == 0
    key = (tmp_path / "nodes" / "site-0.key").read_bytes()
    assert main(["certs", "node", str(tmp_path), "site-0"]) == 2
    assert (tmp_path / "nodes" / "site-0.key").read_bytes() == key
    assert main(["certs", "node", str(tmp_path), "site-0", "--force"]) == 0
    assert (tmp_path / "nodes" / "site-0.key").read_bytes() != key


def test_node_keys_are_openssh_ec_keys_flower_accepts(tmp_path, capsys):
    assert main(["certs", "node", str(tmp_path), "site-1"]) == 0
    private = tmp_path / "nodes" / "site-1.key"
    public = tmp_path / "nodes" / "site-1.pub"
    assert _mode(private) == 0o600
    key = load_ssh_private_key(private.read_bytes(), None)  # as flower-supernode loads it
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    pub = load_ssh_public_key(public.read_bytes())
    assert pub.public_numbers() == key.public_key().public_numbers()
    assert try_load_public_key(public)  # as `flwr supernode register` loads it


@pytest.mark.parametrize("site", ["", "../x", ".hidden"])
def test_a_site_name_that_is_no_file_name_is_refused(tmp_path, site, capsys):
    assert main(["certs", "node", str(tmp_path), site]) == 2


def test_certs_server_reissues_from_the_same_ca_so_every_ca_crt_stays_valid(tmp_path, capsys):
    assert main(["certs", "init", str(tmp_path), "--host", "localhost"]) == 0
    ca_before = (tmp_path / "ca.crt").read_bytes(), (tmp_path / "ca-private" / "ca.key").read_bytes()
    old = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    assert main(["certs", "server", str(tmp_path), "--host", "localhost"]) == 2  # no silent overwrite
    assert main(["certs", "server", str(tmp_path), "--host", "localhost", "--host", "127.0.0.2",
                 "--force"]) == 0
    assert ((tmp_path / "ca.crt").read_bytes(), (tmp_path / "ca-private" / "ca.key").read_bytes()) == ca_before
    ca = x509.load_pem_x509_certificate(ca_before[0])
    new = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    assert new.serial_number != old.serial_number
    new.verify_directly_issued_by(ca)
    san = new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.2")]
    assert _mode(tmp_path / "server.key") == 0o600


def test_certs_server_without_a_ca_is_one_line(tmp_path, capsys):
    assert main(["certs", "server", str(tmp_path), "--host", "localhost"]) == 2
    err = capsys.readouterr().err
    assert "no usable CA" in err and err.count("\n") == 1


def test_certs_server_reads_a_ca_key_moved_offline_and_names_the_legacy_layout(tmp_path, capsys):
    certs = tmp_path / "study-certs"
    assert main(["certs", "init", str(certs), "--host", "localhost"]) == 0
    offline = tmp_path / "usb" / "ca.key"
    offline.parent.mkdir()
    (certs / "ca-private" / "ca.key").rename(offline)
    assert main(["certs", "server", str(certs), "--host", "localhost", "--force"]) == 2
    assert "--ca-key" in capsys.readouterr().err
    assert main(["certs", "server", str(certs), "--host", "localhost", "--force", "--ca-key", str(offline)]) == 0
    # a CA key where older fedir wrote it, beside what nginx reads: told how to move it
    offline.rename(certs / "ca.key")
    assert main(["certs", "server", str(certs), "--host", "localhost", "--force"]) == 2
    assert "mkdir -m 700" in capsys.readouterr().err
