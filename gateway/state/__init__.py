"""The Redis side of every call: ledger scripts, journal entries, idempotency records, the reaper."""
