"""Mutual TLS on a real server on loopback: only callers with a certificate from the trusted CA get through."""

from __future__ import annotations

import http.client
import io
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from conftest import server_config
from PIL import Image

from serving.cli import main
from serving.client import Client
from serving.config import ConfigError, load_config
from serving.server import Server

EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def issue(folder: Path, name: str, *, ca: tuple[Path, Path] | None = None, extensions: str = "") -> tuple[Path, Path]:
    """name.pem and name.key made with openssl: a self-signed CA when `ca` is None, else a certificate
    signed by that (certificate, key) pair with the given X.509 v3 `extensions` (one per line)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command to make test certificates (and the cryptography package is not used)")
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subject = ["-subj", f"/CN={name}", "-days", "1", "-keyout", str(key)]
    if ca is None:
        run = [openssl, "req", "-x509", *EC_KEY, *subject, "-out", str(cert)]
        subprocess.run(run, check=True, capture_output=True)
        return cert, key
    csr, ext = folder / f"{name}.csr", folder / f"{name}.ext"
    ext.write_text(extensions)
    subprocess.run([openssl, "req", "-new", *EC_KEY, *subject, "-out", str(csr)], check=True, capture_output=True)
    subprocess.run(
        [
            openssl,
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca[0]),
            "-CAkey",
            str(ca[1]),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            str(ext),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("pki")
    ca, other_ca = issue(folder, "ca"), issue(folder, "untrusted-ca")
    client = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"
    server = "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
    return {
        "ca": ca,
        "server": issue(folder, "localhost", ca=ca, extensions=server),
        "client": issue(folder, "client", ca=ca, extensions=client),
        "stranger": issue(folder, "stranger", ca=other_ca, extensions=client),
    }


@pytest.fixture(scope="module")
def server(tiny_bundle, pki):
    cert, key = pki["server"]
    config = server_config(tiny_bundle, tls_cert=cert, tls_key=key, tls_client_ca=pki["ca"][0])
    with Server(config) as srv:
        yield srv


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 50, 40)).save(buf, "PNG")
    return buf.getvalue()


class TestHandshake:
    def test_a_client_with_a_trusted_certificate_is_served(self, server, pki):
        cert, key = pki["client"]
        with Client(f"127.0.0.1:{server.port}", tls_ca=pki["ca"][0], tls_cert=cert, tls_key=key, timeout=30) as c:
            assert c.health() == "SERVING"
            assert c.predict(png()).predictions

    @pytest.mark.parametrize("identity", [None, "stranger"], ids=["no certificate", "certificate from another CA"])
    def test_other_clients_are_refused_in_the_handshake(self, server, pki, identity):
        cert, key = pki[identity] if identity else (None, None)
        with Client(f"127.0.0.1:{server.port}", tls_ca=pki["ca"][0], tls_cert=cert, tls_key=key, timeout=10) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.predict(png())
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    def test_serving_predict_presents_the_client_certificate(self, server, pki, tmp_path, capsys):
        image = tmp_path / "red.png"
        image.write_bytes(png())
        cert, key = pki["client"]
        flags = ["--tls-ca", str(pki["ca"][0]), "--tls-cert", str(cert), "--tls-key", str(key)]
        assert main(["predict", "--target", f"127.0.0.1:{server.port}", *flags, str(image)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{image}: ") and "views]" in out


class TestHttps:
    """The HTTP/REST port has the gRPC port's TLS: the same certificate, the same client CA."""

    def context(self, pki, identity: str | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(pki["ca"][0]))
        if identity:
            context.load_cert_chain(*map(str, pki[identity]))
        return context

    def test_a_client_with_a_trusted_certificate_is_served(self, server, pki):
        url = f"https://127.0.0.1:{server.http_port}/v2/health/ready"
        assert urllib.request.urlopen(url, context=self.context(pki, "client"), timeout=10).status == 200

    @pytest.mark.parametrize("identity", [None, "stranger"], ids=["no certificate", "certificate from another CA"])
    def test_other_clients_are_refused_in_the_handshake(self, server, pki, identity):
        url = f"https://127.0.0.1:{server.http_port}/v2/health/ready"
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(url, context=self.context(pki, identity), timeout=10).read()

    def test_plain_http_gets_no_answer(self, server):
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v2/health/ready", timeout=10).read()


@pytest.mark.parametrize("flags", [{"tls_cert": "c.pem"}, {"tls_key": "k.pem"}], ids=["cert only", "key only"])
def test_client_certificate_and_key_go_together(flags):
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        Client("127.0.0.1:1", tls_ca=b"ca", **flags)


class TestConfig:
    @pytest.fixture
    def files(self, tmp_path) -> dict[str, str]:
        for name in ("cert", "key", "ca"):
            (tmp_path / f"{name}.pem").write_text(name)
        return {
            "bundle": "b",
            "tls_cert": str(tmp_path / "cert.pem"),
            "tls_key": str(tmp_path / "key.pem"),
            "tls_client_ca": str(tmp_path / "ca.pem"),
        }

    def test_environment_variable_and_off(self, files):
        env = {"SERVING_TLS_CLIENT_CA": files.pop("tls_client_ca")}
        assert load_config(files, environ=env).tls_client_ca == Path(env["SERVING_TLS_CLIENT_CA"])
        assert load_config({**files, "tls_client_ca": "off"}, environ=env).tls_client_ca is None

    def test_a_client_ca_needs_the_servers_own_certificate(self, files):
        with pytest.raises(ConfigError, match="tls_client_ca needs tls_cert and tls_key"):
            load_config({"bundle": "b", "tls_client_ca": files["tls_client_ca"]}, environ={})

    def test_a_missing_client_ca_file_is_named(self, files):
        with pytest.raises(ConfigError, match=r"tls_client_ca: /nonexistent/ca.pem: no such file"):
            load_config({**files, "tls_client_ca": "/nonexistent/ca.pem"}, environ={})
