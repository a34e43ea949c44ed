"""Replaying the hash-chained, per-session journal (Redis Streams), above the state layer.

recorded.py   verify_session, recorded replays (ReplayProvider)
live.py       live replays through the Exchange
The entry format and chain live in gateway/state/entries.py, paging and export in
gateway/state/export.py.

Retention, explicitly: nothing is ever trimmed by a bare MAXLEN.
- A session's journal stream, its head and its replay keys get EXPIREAT at the session's
  expiry plus `journal.retention_s` (default 30 days), set when the session is opened,
  so they go together with the session hash and never before it.
- The global index streams (`journal_index:{idx:K}`, one per index shard) are trimmed by
  MINID to the same retention window: they only point at per-session entries and hold no bodies.
- Anything earlier goes only after archiving: `abc-gateway journal export SESSION
  > file.jsonl --trim` writes every entry exactly as stored, then drops the exported
  entries (XTRIM MINID through the last one, proven by its hash). The head remembers the
  last trimmed seq and hash, so `verify` checks what is left from there, and the archive
  verifies offline with `verify_chain(lines_to_entries(...))`.
"""
