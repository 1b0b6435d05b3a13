#!/usr/bin/env node
// Verify Bursar webhook deliveries (Node.js 16+, built-in `crypto` only).
//
// Bursar signs every delivery twice; check one of them over the *raw* request body
// (re-serialised JSON has different bytes and will not verify; with Express use
// `express.raw({ type: "application/json" })` on the webhook route):
//
// - verify(...)    : Standard Webhooks headers `webhook-id`, `webhook-timestamp`,
//                    `webhook-signature`. The timestamp is signed, so replays outside the
//                    tolerance fail. Prefer this one.
// - verifyHex(...) : `X-Webhook-Signature` (and `X-Webhook-Signature-Previous` during a
//                    secret rotation): hex HMAC-SHA256 of the body keyed with the whole
//                    `whsec_...` string. No timestamp is signed: de-duplicate by `webhook-id`.
//
// Both throw WebhookVerificationError on failure; answer 401 and do not process.
// Running `node verify.js` checks the published test vector and exits 0 on success.
"use strict";

const crypto = require("crypto");

const TOLERANCE_SECONDS = 5 * 60;
const SECRET_PREFIX = "whsec_";

class WebhookVerificationError extends Error {}

// HTTP header names are case-insensitive; Node lowercases them, other sources may not.
function lowerKeys(headers) {
  const out = {};
  for (const [k, v] of Object.entries(headers)) {
    out[k.toLowerCase()] = Array.isArray(v) ? v.join(" ") : v;
  }
  return out;
}

function keyBytes(secret) {
  if (!secret.startsWith(SECRET_PREFIX)) {
    throw new TypeError("webhook secret must start with whsec_");
  }
  return Buffer.from(secret.slice(SECRET_PREFIX.length), "base64");
}

// Constant-time comparison; timingSafeEqual needs equal lengths, and a length mismatch
// (a truncated signature) is simply not a match.
function sameBytes(a, b) {
  return a.length === b.length && crypto.timingSafeEqual(a, b);
}

/**
 * Check the Standard Webhooks signature.
 * @param {object} headers request headers (any case)
 * @param {Buffer|string} body the raw body as received
 * @param {string[]} secrets the `whsec_...` secrets you accept (old and new during a rotation)
 * @param {number} [now] Unix seconds; defaults to the system clock
 * @returns {string} the webhook-id, to de-duplicate on
 */
function verify(headers, body, secrets, now = Math.floor(Date.now() / 1000), tolerance = TOLERANCE_SECONDS) {
  const h = lowerKeys(headers);
  const msgId = h["webhook-id"];
  const timestamp = h["webhook-timestamp"];
  const signatures = h["webhook-signature"];
  for (const [name, value] of [["webhook-id", msgId], ["webhook-timestamp", timestamp], ["webhook-signature", signatures]]) {
    if (value === undefined) throw new WebhookVerificationError("missing header " + name);
  }
  if (msgId === "" || msgId.includes(".")) throw new WebhookVerificationError("invalid header webhook-id");
  if (!/^[0-9]+$/.test(timestamp)) throw new WebhookVerificationError("invalid header webhook-timestamp");
  const ts = Number(timestamp);
  if (!Number.isSafeInteger(ts)) throw new WebhookVerificationError("invalid header webhook-timestamp");
  if (now - ts > tolerance) throw new WebhookVerificationError("webhook timestamp is too old");
  if (ts - now > tolerance) throw new WebhookVerificationError("webhook timestamp is too far in the future");

  const message = Buffer.concat([Buffer.from(`${msgId}.${ts}.`, "utf8"), Buffer.from(body)]);
  const expected = secrets.map((s) => crypto.createHmac("sha256", keyBytes(s)).update(message).digest());
  for (const entry of signatures.split(" ")) {
    const comma = entry.indexOf(",");
    if (comma < 0 || entry.slice(0, comma) !== "v1") continue; // v1a and others are not HMAC
    const encoded = entry.slice(comma + 1);
    // Buffer.from(_, "base64") never throws, so reject non-base64 explicitly.
    if (!/^[A-Za-z0-9+/]*={0,2}$/.test(encoded)) continue;
    const presented = Buffer.from(encoded, "base64");
    if (expected.some((e) => sameBytes(e, presented))) return msgId;
  }
  throw new WebhookVerificationError("no matching webhook signature");
}

/**
 * Check `X-Webhook-Signature` (or `X-Webhook-Signature-Previous`).
 * Proves who sent the body, not when: de-duplicate by webhook-id.
 */
function verifyHex(headers, body, secrets) {
  const h = lowerKeys(headers);
  if (h["x-webhook-signature"] === undefined) {
    throw new WebhookVerificationError("missing header x-webhook-signature");
  }
  const raw = Buffer.from(body);
  const expected = secrets.map((s) => crypto.createHmac("sha256", Buffer.from(s, "utf8")).update(raw).digest());
  for (const name of ["x-webhook-signature", "x-webhook-signature-previous"]) {
    const value = h[name];
    // Buffer.from(_, "hex") stops at the first bad character, so validate first.
    if (value === undefined || !/^([0-9a-fA-F]{2})+$/.test(value)) continue;
    const presented = Buffer.from(value, "hex");
    if (expected.some((e) => sameBytes(e, presented))) return;
  }
  throw new WebhookVerificationError("no matching webhook signature");
}

module.exports = { verify, verifyHex, WebhookVerificationError, TOLERANCE_SECONDS };

function selfTest() {
  const secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
  const body = Buffer.from('{"email":"test@example.com","username":"test_user"}', "utf8");
  const headers = {
    "webhook-id": "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
    "webhook-timestamp": "1649367553",
    "webhook-signature": "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
    "X-Webhook-Signature": "e0fc16c6d4a28f39a6e0935569f05d86e87367db24a4b6d9271215c603e49f6a",
  };
  const now = 1649367553;
  const tampered = Buffer.from(body);
  tampered[tampered.length - 3] ^= 0x20;
  let failed = 0;
  const check = (name, fn, shouldPass) => {
    let passed = true;
    let why = "";
    try {
      fn();
    } catch (e) {
      if (!(e instanceof WebhookVerificationError)) throw e;
      passed = false;
      why = e.message;
    }
    const ok = passed === shouldPass;
    if (!ok) failed++;
    console.log(`${ok ? "ok  " : "FAIL"} ${name}${ok ? "" : shouldPass ? ": " + why : ": accepted"}`);
  };
  check("standard vector", () => verify(headers, body, [secret], now), true);
  check("hex vector", () => verifyHex(headers, body, [secret]), true);
  check("standard tampered body", () => verify(headers, tampered, [secret], now), false);
  check("hex tampered body", () => verifyHex(headers, tampered, [secret]), false);
  check("too old", () => verify(headers, body, [secret], now + 301), false);
  return failed === 0 ? 0 : 1;
}

if (require.main === module) {
  process.exitCode = selfTest();
}
