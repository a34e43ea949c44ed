-- journal_append_v1: append one entry to a session's hash-chained journal, optionally
-- setting one session field in the same step (revocation, opening a session).
--
-- KEYS: 1 journal, 2 journal_head, 3 session
-- ARGV: 1 digest, 2 step, 3 session field to set ("" = none), 4 its value,
--       5.. journal fields (name, value, ...)

if ARGV[3] ~= '' then
  if redis.call('EXISTS', KEYS[3]) == 0 then return false end
  redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
end
local seq, id = journal_append(KEYS[1], KEYS[2], ARGV[1], ARGV[2], 5)
return {seq, id}
