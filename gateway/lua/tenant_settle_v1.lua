-- tenant_settle_v1: close a tenant hold. "settle" turns it into the actual cost;
-- "release" (the session refused the request, or it never ran) gives it all back,
-- request and token counts included. A hold already closed (settled, or reaped by the
-- reaper, which leaves it charged in full) is left alone, so running this twice is safe.
--
-- KEYS: 1 tenant holds, 2 tenant spend of the hold's day, 3 req/min and 4 tok/min of the
--       hold's minute (the caller kept the day and minute of the hold it made)
-- ARGV: 1 hold ("session|request"), 2 actual_nanos, 3 "settle" | "release"

local h = redis.call('HGET', KEYS[1], ARGV[1])
if not h then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
local a, b, day, req, tok = string.match(h, '^([^:]*):([^:]*):([^:]*):([^:]*):(.*)$')
local est_nanos, est_tokens = tonumber(a), tonumber(b)
local function int(n) return string.format('%d', n) end
-- Only the counters the hold charged are corrected, and one that expired is not brought back.
if day ~= '' and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('INCRBY', KEYS[2], int(tonumber(ARGV[2]) - est_nanos))
end
if ARGV[3] == 'release' then
  if req == '1' and redis.call('EXISTS', KEYS[3]) == 1 then redis.call('DECRBY', KEYS[3], 1) end
  if tok == '1' and redis.call('EXISTS', KEYS[4]) == 1 then redis.call('DECRBY', KEYS[4], int(est_tokens)) end
end
return 1
