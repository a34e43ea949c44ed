-- budget_reap_v1: settle one orphaned reservation (its replica crashed) conservatively:
-- the whole reservation becomes spend, and the request is closed with an `aborted`
-- journal entry. The caller read the reservation first and built the entry (with its
-- cost) from it; if the reservation changed meanwhile, nothing is done.
-- A later settle from a slow-but-alive replica corrects the spend down.
--
-- KEYS: 1 session, 2 reservations, 3 journal, 4 journal_head
-- ARGV: 1 request_id, 2 the reservation as read, 3 digest, 4.. journal fields

local r = redis.call('HGET', KEYS[2], ARGV[1])
if r ~= ARGV[2] then return false end
local a, b, _, step = string.match(r, '^([^:]*):([^:]*):([^:]*):(.*)$')
redis.call('HSET', KEYS[2], ARGV[1], 'R' .. r)
-- "0 - x", never "-x": Lua's -0 is sent as "-0", which HINCRBY rejects as not an integer.
redis.call('HINCRBY', KEYS[1], 'reserved_nanos', 0 - tonumber(a))
redis.call('HINCRBY', KEYS[1], 'reserved_tokens', 0 - tonumber(b))
redis.call('HINCRBY', KEYS[1], 'spent_nanos', tonumber(a))
redis.call('HINCRBY', KEYS[1], 'spent_tokens', tonumber(b))

journal_append(KEYS[3], KEYS[4], ARGV[3], step, 4)
return 1
