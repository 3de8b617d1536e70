"""NATS decentralized (JWT) auth for tests: an operator, one account, one user, a .creds file.

Used by the pipeline integration tests to run a real nats-server in operator mode and
connect with a `.creds` file, as a cluster with NSC-managed accounts does. Built from
the `nkeys` package (the one nats-py uses to sign the server's nonce) and the standard
library; the JWT layout is the one nats-server's `jwt/v2` decodes:

- header `{"typ":"JWT","alg":"ed25519-nkey"}`; header, claims and the ed25519
  signature of `header.claims` are base64url without padding;
- claims `jti` (base32, no padding, of the SHA-512/256 of the claims JSON without
  `jti`), `iat`, `iss` (the signer's public key), `sub`, `name` and a `nats`
  section with `type` (operator / account / user) and `version` 2;
- an account needs JetStream limits (`mem_storage`, `disk_storage`, `streams`,
  `consumer`) or the server does not enable JetStream for it;
- JetStream in operator mode also needs a system account, or the server stops with
  "setting up internal jetstream subscriptions failed: system account not setup".

    trust = natsauth.Trust.create()
    server = NatsServer(extra_config=trust.server_config())
    trust.write_creds(secret_dir / "creds")

Docs: https://docs.nats.io/running-a-nats-service/configuration/securing_nats/jwt
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import nkeys

_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
# -1 everywhere: no limit. JetStream is only on for an account whose limits name it.
_ACCOUNT_LIMITS = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
    "mem_storage": -1,
    "disk_storage": -1,
    "streams": -1,
    "consumer": -1,
}
_USER_LIMITS = {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@dataclasses.dataclass(frozen=True)
class Key:
    """An nkey: its seed (secret, `S...`) and public key (`O...`, `A...`, `U...`)."""

    seed: str
    public: str

    @classmethod
    def create(cls, prefix: int) -> Key:
        """A new random key of one role (`nkeys.PREFIX_BYTE_OPERATOR`, `_ACCOUNT`, `_USER`)."""
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        return cls(seed=seed.decode(), public=nkeys.from_seed(seed).public_key.decode())

    def sign(self, data: bytes) -> bytes:
        """The ed25519 signature of `data`."""
        signature: bytes = nkeys.from_seed(self.seed.encode()).sign(data)
        return signature


def encode_jwt(signer: Key, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A JWT with the claims `nats-server` expects, signed by `signer`."""
    body: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": signer.public,
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    # The id is the hash of the claims without it (jwt/v2 leaves the empty jti out).
    digest = hashlib.new("sha512_256", _json(body)).digest()
    claims = {"jti": base64.b32encode(digest).rstrip(b"=").decode(), **body}
    signing_input = f"{_b64(_json(_HEADER))}.{_b64(_json(claims))}"
    return f"{signing_input}.{_b64(signer.sign(signing_input.encode()))}"


def creds_text(user_jwt: str, user_seed: str) -> str:
    """A `.creds` file: the user JWT and its nkey seed, in the format `nsc` writes."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n"
        "\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n"
        "\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user_seed}\n"
        "------END USER NKEY SEED------\n"
        "\n"
        "*************************************************************\n"
    )


@dataclasses.dataclass(frozen=True)
class Trust:
    """An operator, its system account, one JetStream-enabled account and one user of it."""

    operator: Key
    system_account: Key
    account: Key
    user: Key
    operator_jwt: str
    system_account_jwt: str
    account_jwt: str
    user_jwt: str

    @classmethod
    def create(cls, account_name: str = "RELAYRL", user_name: str = "actor") -> Trust:
        """Fresh keys and JWTs: operator -> (system account, account -> user)."""
        operator = Key.create(nkeys.PREFIX_BYTE_OPERATOR)
        system_account = Key.create(nkeys.PREFIX_BYTE_ACCOUNT)
        account = Key.create(nkeys.PREFIX_BYTE_ACCOUNT)
        user = Key.create(nkeys.PREFIX_BYTE_USER)
        operator_jwt = encode_jwt(
            operator,
            operator.public,
            "relayrl-test",
            {"type": "operator", "system_account": system_account.public},
        )
        system_account_jwt = encode_jwt(operator, system_account.public, "SYS", {"type": "account"})
        account_jwt = encode_jwt(
            operator,
            account.public,
            account_name,
            {
                "type": "account",
                "limits": _ACCOUNT_LIMITS,
                "default_permissions": {"pub": {}, "sub": {}},
            },
        )
        user_jwt = encode_jwt(account, user.public, user_name, {"type": "user", **_USER_LIMITS})
        return cls(
            operator,
            system_account,
            account,
            user,
            operator_jwt,
            system_account_jwt,
            account_jwt,
            user_jwt,
        )

    def server_config(self) -> str:
        """nats-server config lines: trust the operator, preload both accounts (MEMORY)."""
        return (
            f"operator: {self.operator_jwt}\n"
            f"system_account: {self.system_account.public}\n"
            "resolver: MEMORY\n"
            "resolver_preload: {\n"
            f"  {self.system_account.public}: {self.system_account_jwt}\n"
            f"  {self.account.public}: {self.account_jwt}\n"
            "}\n"
        )

    def write_creds(self, path: Path) -> Path:
        """Write the user's `.creds` file (mode 0600, as a mounted Secret would be)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(creds_text(self.user_jwt, self.user.seed))
        path.chmod(0o600)
        return path


def stranger_creds() -> str:
    """A `.creds` file of a user of an account the server was not given: it is refused."""
    account = Key.create(nkeys.PREFIX_BYTE_ACCOUNT)
    user = Key.create(nkeys.PREFIX_BYTE_USER)
    user_jwt = encode_jwt(account, user.public, "stranger", {"type": "user", **_USER_LIMITS})
    return creds_text(user_jwt, user.seed)
