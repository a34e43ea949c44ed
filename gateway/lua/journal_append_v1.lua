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
local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
local prev = redis.call('HGET', KEYS[2], 'hash') or ''
local h = redis.sha1hex(prev .. '|' .. seq .. '|' .. ARGV[1] .. '|' .. ARGV[2])
redis.call('HSET', KEYS[2], 'hash', h)
local xadd = {'XADD', KEYS[1], '*', 'seq', seq, 'prev', prev, 'hash', h, 'digest', ARGV[1], 'step', ARGV[2]}
for i = 5, #ARGV do xadd[#xadd + 1] = ARGV[i] end
local id = redis.call(unpack(xadd))
return {tostring(seq), id}
