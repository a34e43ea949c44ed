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

local function int(n) return string.format('%d', n) end
local c = redis.call('HMGET', KEYS[1], 'budget_nanos', 'spent_nanos', 'reserved_nanos', 'spent_tokens', 'reserved_tokens')
local spent, reserved = tonumber(c[2] or '0'), tonumber(c[3] or '0')
local spent_tokens, reserved_tokens = tonumber(c[4] or '0'), tonumber(c[5] or '0')
if reaped then
  -- The reaper moved the whole reservation into spend; give back what was not used.
  spent = spent + actual_nanos - est_nanos
  spent_tokens = spent_tokens + actual_tokens - est_tokens
else
  reserved = reserved - est_nanos
  reserved_tokens = reserved_tokens - est_tokens
  spent = spent + actual_nanos
  spent_tokens = spent_tokens + actual_tokens
end
local fields = {'spent_nanos', int(spent), 'reserved_nanos', int(reserved),
  'spent_tokens', int(spent_tokens), 'reserved_tokens', int(reserved_tokens)}
if ARGV[4] == '1' and step ~= '' then
  fields[#fields + 1] = 'step'
  fields[#fields + 1] = step
end
redis.call('HSET', KEYS[1], unpack(fields))
if tenant_day and tenant_day == string.match(KEYS[5], ':(%d+)$') and redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('INCRBY', KEYS[5], int(actual_nanos - est_nanos))
end

local seq, id = journal_append(KEYS[3], KEYS[4], ARGV[5], step, 6)

local left = -1
if c[1] then left = tonumber(c[1]) - spent - reserved end
return {int(left), seq, id, step}
