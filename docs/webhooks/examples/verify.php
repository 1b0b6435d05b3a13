<?php
// Verify Bursar webhook deliveries (PHP 7.4+, no extensions beyond the defaults).
//
// Bursar signs every delivery twice; check one of them over the *raw* request body,
// file_get_contents('php://input') (json_decode + json_encode changes the bytes and will
// not verify):
//
// - verify(...)     : Standard Webhooks headers `webhook-id`, `webhook-timestamp`,
//                     `webhook-signature`. The timestamp is signed, so replays outside the
//                     tolerance fail. Prefer this one.
// - verify_hex(...) : `X-Webhook-Signature` (and `X-Webhook-Signature-Previous` during a
//                     secret rotation): hex HMAC-SHA256 of the body keyed with the whole
//                     `whsec_...` string. No timestamp is signed: de-duplicate by `webhook-id`.
//
// Both throw WebhookVerificationError on failure; answer 401 and do not process.
// Pass getallheaders() (or a PSR-7 $request->getHeaders()) as $headers.
// Running `php verify.php` checks the published test vector and exits 0 on success.

declare(strict_types=1);

namespace Bursar\Webhooks;

const TOLERANCE_SECONDS = 300;
const SECRET_PREFIX = 'whsec_';

final class WebhookVerificationError extends \RuntimeException
{
}

/** HTTP header names are case-insensitive; PHP sources spell them differently. */
function lower_keys(array $headers): array
{
    $out = [];
    foreach ($headers as $name => $value) {
        $out[strtolower((string) $name)] = is_array($value) ? implode(' ', $value) : (string) $value;
    }
    return $out;
}

function key_bytes(string $secret): string
{
    if (strncmp($secret, SECRET_PREFIX, strlen(SECRET_PREFIX)) !== 0) {
        throw new \InvalidArgumentException('webhook secret must start with whsec_');
    }
    $key = base64_decode(substr($secret, strlen(SECRET_PREFIX)), true);
    if ($key === false) {
        throw new \InvalidArgumentException('webhook secret is not valid base64');
    }
    return $key;
}

/** Constant-time; a length mismatch (a truncated signature) is simply not a match. */
function matches_any(string $presented, array $expected): bool
{
    foreach ($expected as $e) {
        if (hash_equals($e, $presented)) {
            return true;
        }
    }
    return false;
}

/**
 * Check the Standard Webhooks signature.
 *
 * @param array    $headers request headers (any case)
 * @param string   $body    the raw body as received
 * @param string[] $secrets the `whsec_...` secrets you accept (old and new during a rotation)
 * @param int|null $now     Unix seconds; defaults to the system clock
 * @return string the webhook-id, to de-duplicate on
 */
function verify(array $headers, string $body, array $secrets, ?int $now = null, int $tolerance = TOLERANCE_SECONDS): string
{
    $h = lower_keys($headers);
    foreach (['webhook-id', 'webhook-timestamp', 'webhook-signature'] as $name) {
        if (!isset($h[$name])) {
            throw new WebhookVerificationError('missing header ' . $name);
        }
    }
    $msgId = $h['webhook-id'];
    $timestamp = $h['webhook-timestamp'];
    if ($msgId === '' || strpos($msgId, '.') !== false) {
        throw new WebhookVerificationError('invalid header webhook-id');
    }
    if (preg_match('/^[0-9]{1,18}\z/', $timestamp) !== 1) {
        throw new WebhookVerificationError('invalid header webhook-timestamp');
    }
    $ts = (int) $timestamp;
    $now = $now ?? time();
    if ($now - $ts > $tolerance) {
        throw new WebhookVerificationError('webhook timestamp is too old');
    }
    if ($ts - $now > $tolerance) {
        throw new WebhookVerificationError('webhook timestamp is too far in the future');
    }

    $message = $msgId . '.' . $ts . '.' . $body;
    $expected = [];
    foreach ($secrets as $secret) {
        $expected[] = hash_hmac('sha256', $message, key_bytes($secret), true);
    }
    foreach (explode(' ', $h['webhook-signature']) as $entry) {
        $parts = explode(',', $entry, 2);
        if (count($parts) !== 2 || $parts[0] !== 'v1') {
            continue; // v1a and other schemes are not HMAC signatures
        }
        $presented = base64_decode($parts[1], true);
        if ($presented !== false && matches_any($presented, $expected)) {
            return $msgId;
        }
    }
    throw new WebhookVerificationError('no matching webhook signature');
}

/**
 * Check `X-Webhook-Signature` (or `X-Webhook-Signature-Previous`).
 * Proves who sent the body, not when: de-duplicate by webhook-id.
 */
function verify_hex(array $headers, string $body, array $secrets): void
{
    $h = lower_keys($headers);
    if (!isset($h['x-webhook-signature'])) {
        throw new WebhookVerificationError('missing header x-webhook-signature');
    }
    $expected = [];
    foreach ($secrets as $secret) {
        $expected[] = hash_hmac('sha256', $body, $secret, true);
    }
    foreach (['x-webhook-signature', 'x-webhook-signature-previous'] as $name) {
        if (!isset($h[$name]) || preg_match('/^(?:[0-9a-fA-F]{2})+\z/', $h[$name]) !== 1) {
            continue;
        }
        if (matches_any((string) hex2bin($h[$name]), $expected)) {
            return;
        }
    }
    throw new WebhookVerificationError('no matching webhook signature');
}

function self_test(): int
{
    $secret = 'whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD';
    $body = '{"email":"test@example.com","username":"test_user"}';
    $headers = [
        'webhook-id' => 'msg_27UH4WbU6Z5A5EzD8u03UvzRbpk',
        'webhook-timestamp' => '1649367553',
        'webhook-signature' => 'v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=',
        'X-Webhook-Signature' => 'e0fc16c6d4a28f39a6e0935569f05d86e87367db24a4b6d9271215c603e49f6a',
    ];
    $now = 1649367553;
    $tampered = str_replace('test_user', 'test_usEr', $body);
    $checks = [
        ['standard vector', true, function () use ($headers, $body, $secret, $now) {
            verify($headers, $body, [$secret], $now);
        }],
        ['hex vector', true, function () use ($headers, $body, $secret) {
            verify_hex($headers, $body, [$secret]);
        }],
        ['standard tampered body', false, function () use ($headers, $tampered, $secret, $now) {
            verify($headers, $tampered, [$secret], $now);
        }],
        ['hex tampered body', false, function () use ($headers, $tampered, $secret) {
            verify_hex($headers, $tampered, [$secret]);
        }],
        ['too old', false, function () use ($headers, $body, $secret, $now) {
            verify($headers, $body, [$secret], $now + 301);
        }],
    ];
    $failed = 0;
    foreach ($checks as [$name, $shouldPass, $fn]) {
        $why = '';
        try {
            $fn();
            $passed = true;
        } catch (WebhookVerificationError $e) {
            $passed = false;
            $why = $e->getMessage();
        }
        $ok = $passed === $shouldPass;
        if (!$ok) {
            $failed++;
        }
        echo ($ok ? 'ok   ' : 'FAIL ') . $name . ($ok ? '' : ($shouldPass ? ': ' . $why : ': accepted')) . "\n";
    }
    return $failed === 0 ? 0 : 1;
}

if (PHP_SAPI === 'cli' && isset($_SERVER['argv'][0]) && realpath($_SERVER['argv'][0]) === realpath(__FILE__)) {
    exit(self_test());
}
