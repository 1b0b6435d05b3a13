#!/usr/bin/env python3
"""Verify Bursar webhook deliveries (Python 3.8+, standard library only).

Bursar signs every delivery twice; check one of them over the *raw* request body
(re-serialised JSON has different bytes and will not verify):

* ``verify(...)``     -- Standard Webhooks headers ``webhook-id``, ``webhook-timestamp``,
  ``webhook-signature``. The timestamp is signed, so replays outside the tolerance fail.
  Prefer this one.
* ``verify_hex(...)`` -- ``X-Webhook-Signature`` (and ``X-Webhook-Signature-Previous``
  during a secret rotation): hex HMAC-SHA256 of the body keyed with the whole ``whsec_...``
  string. No timestamp is signed: de-duplicate by ``webhook-id``.

Both raise ``WebhookVerificationError`` on failure; answer 401 and do not process.

Running ``python3 verify.py`` checks the published test vector and exits 0 on success.
"""

import base64
import binascii
import hashlib
import hmac
import re
import sys
import time

TOLERANCE_SECONDS = 5 * 60
SECRET_PREFIX = "whsec_"
_DIGITS = re.compile(r"[0-9]+")


class WebhookVerificationError(Exception):
    """The delivery is not from Bursar, was altered, or is stale."""


def _lower_keys(headers):
    # HTTP header names are case-insensitive; frameworks differ in how they spell them.
    return {str(k).lower(): v for k, v in dict(headers).items()}


def _as_bytes(body):
    return body.encode("utf-8") if isinstance(body, str) else bytes(body)


def _key_bytes(secret):
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("webhook secret must start with whsec_")
    return base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)


def verify(headers, body, secrets, now=None, tolerance=TOLERANCE_SECONDS):
    """Check the Standard Webhooks signature.

    headers: mapping of request headers (any case). body: the raw bytes as received.
    secrets: list of ``whsec_...`` secrets you currently accept (old and new during a
    rotation). now: Unix seconds, defaults to the system clock.
    Returns the ``webhook-id`` (use it to de-duplicate) or raises.
    """
    h = _lower_keys(headers)
    msg_id = h.get("webhook-id")
    timestamp = h.get("webhook-timestamp")
    signatures = h.get("webhook-signature")
    for name, value in (("webhook-id", msg_id), ("webhook-timestamp", timestamp),
                        ("webhook-signature", signatures)):
        if value is None:
            raise WebhookVerificationError("missing header " + name)
    if not msg_id or "." in msg_id:
        raise WebhookVerificationError("invalid header webhook-id")
    if not _DIGITS.fullmatch(timestamp):
        raise WebhookVerificationError("invalid header webhook-timestamp")
    ts = int(timestamp)
    now = int(time.time()) if now is None else int(now)
    if now - ts > tolerance:
        raise WebhookVerificationError("webhook timestamp is too old")
    if ts - now > tolerance:
        raise WebhookVerificationError("webhook timestamp is too far in the future")

    message = msg_id.encode("utf-8") + b"." + str(ts).encode("ascii") + b"." + _as_bytes(body)
    expected = [hmac.new(_key_bytes(s), message, hashlib.sha256).digest() for s in secrets]
    for entry in signatures.split(" "):
        version, _, encoded = entry.partition(",")
        if version != "v1":
            continue  # other schemes (v1a, ...) are not HMAC signatures
        try:
            presented = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        for e in expected:
            if hmac.compare_digest(e, presented):
                return msg_id
    raise WebhookVerificationError("no matching webhook signature")


def verify_hex(headers, body, secrets):
    """Check ``X-Webhook-Signature`` (or ``X-Webhook-Signature-Previous``).

    Proves who sent the body, not when: de-duplicate by ``webhook-id``. Raises on failure.
    """
    h = _lower_keys(headers)
    if h.get("x-webhook-signature") is None:
        raise WebhookVerificationError("missing header x-webhook-signature")
    raw = _as_bytes(body)
    expected = [hmac.new(s.encode("utf-8"), raw, hashlib.sha256).digest() for s in secrets]
    for name in ("x-webhook-signature", "x-webhook-signature-previous"):
        value = h.get(name)
        if value is None:
            continue
        try:
            presented = bytes.fromhex(value)
        except ValueError:
            continue
        for e in expected:
            if hmac.compare_digest(e, presented):
                return
    raise WebhookVerificationError("no matching webhook signature")


def _self_test():
    secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
    body = b'{"email":"test@example.com","username":"test_user"}'
    headers = {
        "webhook-id": "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
        "webhook-timestamp": "1649367553",
        "webhook-signature": "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
        "X-Webhook-Signature": "e0fc16c6d4a28f39a6e0935569f05d86e87367db24a4b6d9271215c603e49f6a",
    }
    now = 1649367553
    tampered = body.replace(b"test_user", b"test_usEr")
    checks = []

    def expect_ok(name, fn):
        try:
            fn()
            checks.append((name, True))
        except WebhookVerificationError as e:
            checks.append((name + ": " + str(e), False))

    def expect_reject(name, fn):
        try:
            fn()
            checks.append((name + ": accepted", False))
        except WebhookVerificationError:
            checks.append((name, True))

    expect_ok("standard vector", lambda: verify(headers, body, [secret], now=now))
    expect_ok("hex vector", lambda: verify_hex(headers, body, [secret]))
    expect_reject("standard tampered body", lambda: verify(headers, tampered, [secret], now=now))
    expect_reject("hex tampered body", lambda: verify_hex(headers, tampered, [secret]))
    expect_reject("too old", lambda: verify(headers, body, [secret], now=now + 301))

    failed = [name for name, ok in checks if not ok]
    for name, ok in checks:
        print(("ok   " if ok else "FAIL ") + name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_self_test())
