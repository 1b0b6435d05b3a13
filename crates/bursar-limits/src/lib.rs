//! Short-window rate limits (spec `api-product.md` §2.2–2.3): one GCRA arithmetic, kept
//! in-process or in Redis.
