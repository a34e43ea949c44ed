-- budget_settle_v1: turn a reservation into actual spend, return the rest, advance
-- the step, and journal the outcome, in one step. A reservation the reaper already
-- charged in full ("R" prefix) is corrected down to the actual spend. The tenant's daily
-- spend counter is corrected only when the reserve charged it ("@day"), and on that day.
--
-- KEYS: 1 session, 2 reservations, 3 journal, 4 journal_head, 5 tenant spend today
-- ARGV: 1 request_id, 2 actual_nanos, 3 actual_tokens, 4 advance ("1": move to the
--       reserved step), 5 digest, 6.. journal fields (name, value, ...)

local actual_nanos = tonumber(ARGV[2])
local actual_tokens = tonumber(ARGV[3])
local r = redis.call('HGET', KEYS[2], ARGV[1])
local est_nanos, est_tokens, step, reaped, tenant_day = 0, 0, '', false, nil
if r then
  if string.sub(r, 1, 1) == 'R' then reaped = true r = string.sub(r, 2) end
  local a, b, c, st = string.match(r, '^([^:]*):([^:]*):([^:]*):(.*)$')
  est_nanos, est_tokens, step = tonumber(a), tonumber(b), st
  tenant_day = string.match(c, '@(%d+)$')
  redis.call('HDEL', KEYS[2], ARGV[1])
end

if reaped then
  -- The reaper moved the whole reservation into spend; give back what was not used.
  redis.call('HINCRBY', KEYS[1], 'spent_nanos', actual_nanos - est_nanos)
  redis.call('HINCRBY', KEYS[1], 'spent_tokens', actual_tokens - est_tokens)
else
  -- "0 - x", never "-x": Lua's -0 is sent as "-0", which HINCRBY rejects (free models).
  redis.call('HINCRBY', KEYS[1], 'reserved_nanos', 0 - est_nanos)
  redis.call('HINCRBY', KEYS[1], 'reserved_tokens', 0 - est_tokens)
  redis.call('HINCRBY', KEYS[1], 'spent_nanos', actual_nanos)
  redis.call('HINCRBY', KEYS[1], 'spent_tokens', actual_tokens)
end
if tenant_day and tenant_day == string.match(KEYS[5], ':(%d+)$') and redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('INCRBY', KEYS[5], actual_nanos - est_nanos)
end
if ARGV[4] == '1' and step ~= '' then
  redis.call('HSET', KEYS[1], 'step', step)
end

local seq = redis.call('HINCRBY', KEYS[4], 'seq', 1)
local prev = redis.call('HGET', KEYS[4], 'hash') or ''
local h = redis.sha1hex(prev .. '|' .. seq .. '|' .. ARGV[5] .. '|' .. step)
redis.call('HSET', KEYS[4], 'hash', h)
local xadd = {'XADD', KEYS[3], '*', 'seq', seq, 'prev', prev, 'hash', h, 'digest', ARGV[5], 'step', step}
for i = 6, #ARGV do xadd[#xadd + 1] = ARGV[i] end
local id = redis.call(unpack(xadd))

local s = redis.call('HMGET', KEYS[1], 'budget_nanos', 'spent_nanos', 'reserved_nanos')
local left = -1
if s[1] then left = tonumber(s[1]) - tonumber(s[2] or '0') - tonumber(s[3] or '0') end
return {tostring(left), tostring(seq), id, step}
