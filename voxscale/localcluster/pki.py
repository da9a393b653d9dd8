"""A throw-away PKI for the local control plane: one CA, a serving cert, client certs, an SA key.

The API server runs with real TLS and client-certificate authentication (RBAC on), so what the
tests see is what a cluster does: a client without credentials is refused, and the operator's
tests can run under a ServiceAccount token instead of cluster-admin.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=30)


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _write_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class LocalCA:
    """Issues certificates for one local cluster; everything it writes lives in `directory`."""

    def __init__(self, directory: Path, stem: str = "ca", common_name: str = "voxscale-local-ca") -> None:
        """Open the CA kept in `directory` as `<stem>.crt/.key`, or make one there: a component started
        after `up` (the real node's kubelet) gets its certificate from the same CA the API server trusts.
        A second stem makes a second, independent CA (the aggregation layer's front proxy)."""
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.pair = KeyPair(directory / f"{stem}.crt", directory / f"{stem}.key")
        if self.pair.cert.exists() and self.pair.key.exists():
            key = serialization.load_pem_private_key(self.pair.key.read_bytes(), password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            self._key = key
            self._cert = x509.load_pem_x509_certificate(self.pair.cert.read_bytes())
            return
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
            .sign(self._key, hashes.SHA256())
        )
        _write_cert(self._cert, self.pair.cert)
        _write_key(self._key, self.pair.key)

    def issue(
        self,
        stem: str,
        common_name: str,
        organization: str | None = None,
        server_names: tuple[str, ...] = (),
    ) -> KeyPair:
        """A leaf cert: a client cert, or a serving cert when server_names (DNS names / IPs) are given."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        usage = [ExtendedKeyUsageOID.SERVER_AUTH] if server_names else [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, organization))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        )
        if server_names:
            sans: list[x509.GeneralName] = []
            for n in server_names:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    sans.append(x509.DNSName(n))
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        pair = KeyPair(self.directory / f"{stem}.crt", self.directory / f"{stem}.key")
        _write_cert(cert, pair.cert)
        _write_key(key, pair.key)
        return pair


def service_account_keys(directory: Path) -> KeyPair:
    """The RSA key pair the API server signs ServiceAccount tokens with (cert field holds the public key)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pair = KeyPair(directory / "sa.pub", directory / "sa.key")
    pair.cert.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    _write_key(key, pair.key)
    return pair


# The aggregation layer (kube-apiserver proxying e.g. metrics.k8s.io to metrics-server). The API server
# authenticates the user and forwards the request with X-Remote-* headers, presenting a client cert
# from a CA of its own: an extension API server believes those headers only from a cert that chains to
# `requestheader-client-ca-file` *and* carries an allowed name. A CA separate from the cluster's keeps
# an ordinary client cert (which the cluster CA issues to every component) from asserting any user.
FRONT_PROXY_CLIENT = "front-proxy-client"  # --requestheader-allowed-names
REQUEST_HEADERS = {  # --requestheader-<flag>: the header names kubeadm and every distribution use
    "username-headers": "X-Remote-User",
    "group-headers": "X-Remote-Group",
    "extra-headers-prefix": "X-Remote-Extra-",
}


@dataclass(frozen=True)
class FrontProxy:
    ca: Path  # --requestheader-client-ca-file
    client: KeyPair  # --proxy-client-cert-file / --proxy-client-key-file


def front_proxy_files(directory: Path) -> FrontProxy:
    """Where `front_proxy` keeps the front-proxy CA and client cert in a cluster's PKI folder (pure)."""
    return FrontProxy(
        directory / "front-proxy-ca.crt",
        KeyPair(directory / f"{FRONT_PROXY_CLIENT}.crt", directory / f"{FRONT_PROXY_CLIENT}.key"),
    )


def front_proxy(directory: Path) -> FrontProxy:
    """Make the front-proxy CA and the API server's proxy client cert in `directory`."""
    ca = LocalCA(directory, stem="front-proxy-ca", common_name="voxscale-front-proxy-ca")
    ca.issue(FRONT_PROXY_CLIENT, FRONT_PROXY_CLIENT)
    return front_proxy_files(directory)
