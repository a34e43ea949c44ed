-- budget_close_v1: close one reservation whose owner is gone, and journal it `aborted`.
-- The caller built the entry (with its cost) from what it read.
--   "full": the reaper's backstop, for a reservation past its TTL: the whole reservation
--           becomes spend; the mark "R" lets a late settle correct it down.
--   "zero": its owner stopped renewing the lease (the process died): nothing was answered,
--           so nothing is charged; the mark "Z" lets a late settle of an owner that was
--           alive after all charge what it used.
-- The reaper passes the reservation as it read it: if it changed meanwhile, nothing is done.
-- A duplicate taking over an Idempotency-Key passes its record and the time instead: the
-- record must still be pending for this request with its lease run out, and is deleted,
-- so the duplicate's next reserve runs the request (one duplicate wins; the rest wait).
-- The tenant's daily counter keeps the estimate either way (as a reaped one always has).
--
-- KEYS: 1 session, 2 reservations, 3 journal, 4 journal_head,
--       5 idempotency record (a never-written stand-in for the reaper)
-- ARGV: 1 request_id, 2 the reservation as read ('' = whichever is open),
--       3 "full" | "zero", 4 now ms to check the record's lease against ('' = no record),
--       5 digest, 6.. journal fields
-- Returns {record taken (0|1), reservation closed (0|1)}.

local taken = 0
if ARGV[4] ~= '' then
  local h = redis.call('HMGET', KEYS[5], 'state', 'rid', 'lease')
  if h[1] ~= 'pending' or h[2] ~= ARGV[1] or not h[3] or tonumber(h[3]) >= tonumber(ARGV[4]) then
    return {0, 0}
  end
  redis.call('DEL', KEYS[5])
  taken = 1
end

local r = redis.call('HGET', KEYS[2], ARGV[1])
if not r or (ARGV[2] ~= '' and r ~= ARGV[2]) then return {taken, 0} end
local mark = string.sub(r, 1, 1)
if mark == 'R' or mark == 'Z' then return {taken, 0} end
local a, b, _, step = string.match(r, '^([^:]*):([^:]*):([^:]*):(.*)$')
-- "0 - x", never "-x": Lua's -0 is sent as "-0", which HINCRBY rejects as not an integer.
redis.call('HINCRBY', KEYS[1], 'reserved_nanos', 0 - tonumber(a))
redis.call('HINCRBY', KEYS[1], 'reserved_tokens', 0 - tonumber(b))
if ARGV[3] == 'full' then
  redis.call('HSET', KEYS[2], ARGV[1], 'R' .. r)
  redis.call('HINCRBY', KEYS[1], 'spent_nanos', tonumber(a))
  redis.call('HINCRBY', KEYS[1], 'spent_tokens', tonumber(b))
else
  redis.call('HSET', KEYS[2], ARGV[1], 'Z' .. r)
end

journal_append(KEYS[3], KEYS[4], ARGV[5], step, 6)
return {taken, 1}
