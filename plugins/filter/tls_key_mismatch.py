# Copyright: openclb developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filter openclb.lb.tls_key_mismatch: does a private key belong to its certificate?"""

from __future__ import annotations

DOCUMENTATION = r"""
name: tls_key_mismatch
short_description: Tell whether a PEM private key is the key of a PEM certificate
version_added: 0.1.0
author: openclb developers
description:
  - Compares the public key of the certificate with the public key derived from the private key.
  - nginx C(-t) accepts a key of another type than its certificate (an EC key next to an RSA
    certificate) and only handshakes fail; this check runs on the controller before any host changes.
  - Material that does not parse is not judged here (the result is empty); nginx C(-t) rejects it
    and names the file.
options:
  _input:
    description: The certificate, PEM.
    type: str
    required: true
  private_key:
    description: The private key, PEM (unencrypted). Never part of the result.
    type: str
    required: true
requirements:
  - cryptography
"""

EXAMPLES = r"""
- name: The key belongs to the certificate
  ansible.builtin.assert:
    that: lookup('file', 'www.crt') | openclb.lb.tls_key_mismatch(lookup('unvault', 'www.key')) == ''
  no_log: true
"""

RETURN = r"""
_value:
  description: An empty string when the key belongs to the certificate (or either does not parse),
    else why not, naming both key types (never key material).
  type: str
"""

from ansible.errors import AnsibleFilterError  # noqa: E402 - Ansible wants DOCUMENTATION first

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
except ImportError:  # pragma: no cover - reported when the filter is used
    x509 = None


def _describe(public_key):
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"EC {public_key.curve.name}"
    return type(public_key).__name__


def tls_key_mismatch(certificate, private_key):
    if x509 is None:
        raise AnsibleFilterError("tls_key_mismatch needs the Python package cryptography on the controller")
    try:
        cert_public = x509.load_pem_x509_certificate(str(certificate).encode()).public_key()
        key_public = serialization.load_pem_private_key(str(private_key).encode(), password=None).public_key()
    except (ValueError, TypeError):
        return ""
    raw = {"encoding": serialization.Encoding.DER, "format": serialization.PublicFormat.SubjectPublicKeyInfo}
    if cert_public.public_bytes(**raw) == key_public.public_bytes(**raw):
        return ""
    return f"the private key ({_describe(key_public)}) is not the certificate's ({_describe(cert_public)})"


class FilterModule:
    def filters(self):
        return {"tls_key_mismatch": tls_key_mismatch}
