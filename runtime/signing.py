"""Ed25519 signatures over an artifact's manifest (which holds the sha256 of every other file).

    manifest.sig = {"algorithm": "ed25519", "key_id": <first 16 hex of sha256(public key)>,
                    "signature": <base64 of the signature over the exact bytes of manifest.json>}

Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public), as `v4c keygen` or
`openssl genpkey -algorithm ed25519` write them.
"""

import base64
import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ArtifactError, V4CError

ALGORITHM = "ed25519"


def _key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: Path) -> tuple[Path, str]:
    """Write a new private key (mode 0600) and `<name>.pub`; -> (public key path, key id)."""
    private_path = Path(private_path)
    if private_path.exists():
        raise V4CError(f"{private_path} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path = private_path.with_name(private_path.name + ".pub")
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return public_path, _key_id(key.public_key())


def _load(path: Path, private: bool):
    try:
        data = Path(path).read_bytes()
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (OSError, ValueError, TypeError) as e:
        raise V4CError(f"{path}: cannot read an Ed25519 {'private' if private else 'public'} key ({e})") from None
    expected = Ed25519PrivateKey if private else Ed25519PublicKey
    if not isinstance(key, expected):
        raise V4CError(f"{path}: not an Ed25519 key (v4c signs with Ed25519)")
    return key


def sign_manifest(manifest_bytes: bytes, private_key: Path) -> bytes:
    key = _load(private_key, private=True)
    sig = {"algorithm": ALGORITHM, "key_id": _key_id(key.public_key()),
           "signature": base64.b64encode(key.sign(manifest_bytes)).decode()}
    return (json.dumps(sig, indent=1, sort_keys=True) + "\n").encode()


def check_signature(manifest_bytes: bytes, signature_bytes: bytes | None, public_key: Path) -> str:
    """-> the key id; raises ArtifactError if the signature is missing, malformed or wrong."""
    key = _load(public_key, private=False)
    if signature_bytes is None:
        raise ArtifactError("manifest.sig: the artifact is not signed (sign it with `v4c sign --key`)")
    try:
        sig = json.loads(signature_bytes)
        raw = base64.b64decode(sig["signature"], validate=True)
        if sig.get("algorithm") != ALGORITHM:
            raise ValueError(f"algorithm {sig.get('algorithm')!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"manifest.sig: malformed signature ({e})") from None
    try:
        key.verify(raw, manifest_bytes)
    except InvalidSignature:
        raise ArtifactError(f"manifest.sig: the signature does not verify with {public_key} (key {_key_id(key)}; "
                            f"signed by key {sig.get('key_id')}): wrong key, or the manifest was changed") from None
    return _key_id(key)
