"""The tls_key_mismatch filter: keys compared with their certificates by public key."""

from __future__ import annotations

import datetime

import pytest
from ansible_collections.openclb.lb.plugins.filter.tls_key_mismatch import FilterModule, tls_key_mismatch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def self_signed(key):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example.com")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
def keys():
    return {"rsa": rsa.generate_private_key(65537, 2048), "rsa2": rsa.generate_private_key(65537, 2048),
            "ec": ec.generate_private_key(ec.SECP256R1())}


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_the_certificates_own_key_matches(keys, kind):
    assert tls_key_mismatch(self_signed(keys[kind]), key_pem(keys[kind])) == ""


def test_another_rsa_key_is_refused_naming_both_types(keys):
    assert tls_key_mismatch(self_signed(keys["rsa"]), key_pem(keys["rsa2"])) == (
        "the private key (RSA 2048) is not the certificate's (RSA 2048)")


def test_an_ec_key_next_to_an_rsa_certificate_is_refused(keys):
    # the case nginx -t lets through
    reason = tls_key_mismatch(self_signed(keys["rsa"]), key_pem(keys["ec"]))
    assert reason == "the private key (EC secp256r1) is not the certificate's (RSA 2048)"
    assert "PRIVATE" not in reason


def test_material_that_does_not_parse_is_left_to_nginx(keys):
    not_a_cert = "-----BEGIN CERTIFICATE-----\nnot a cert\n-----END CERTIFICATE-----"
    assert tls_key_mismatch(not_a_cert, key_pem(keys["rsa"])) == ""
    assert tls_key_mismatch(self_signed(keys["rsa"]), "garbage") == ""


def test_registered_under_its_name():
    assert FilterModule().filters()["tls_key_mismatch"] is tls_key_mismatch
