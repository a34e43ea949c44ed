-- budget_settle_v2: turn a reservation into actual spend, return the rest, advance
-- the step, and journal the outcome, in one step. A reservation already closed for its
-- owner is corrected to the actual spend: "R" (the reaper charged it in full) down,
-- "Z" (closed at nothing: its lease ran out) up. The tenant's daily spend counter is
-- corrected only when the reserve charged it ("@day"), and on that day.
-- Idempotent: a request already settled (no reservation left), or a reservation made at
-- another time under the same request id, is left alone and nothing is journaled, so a
-- settlement retried after Redis came back never charges twice.
-- A keyed request's pending Idempotency-Key record (only while it still names this
-- request) is settled in the same step: "keep" stores the answer, so the settlement and
-- the answer a retry gets can't be parted by a crash; "free" deletes it (the request
-- failed), so a retry runs again.
--
-- KEYS: 1 session, 2 reservations, 3 journal, 4 journal_head, 5 tenant spend today,
--       6 idempotency record (a never-written stand-in when the request has no key)
-- ARGV: 1 request_id, 2 actual_nanos, 3 actual_tokens, 4 advance ("1": move to the
--       reserved step), 5 reserve time ms of the reservation ('' = whichever),
--       6 the record: '' | 'free' | 'keep', then for 'keep': 7 status, 8 headers (JSON),
--       9 body, 10 its encoding ('' | 'zlib'), 11 ttl ms, 12 '1': store the budget left too
--       (an answer's header that only this step knows), 13 digest, 14.. journal fields
-- Returns {budget left ('-1' = no usd budget), seq ('0' = nothing done), entry id, step}.

local function int(n) return string.format('%d', n) end

local c = redis.call('HMGET', KEYS[1], 'budget_nanos', 'spent_nanos', 'reserved_nanos', 'spent_tokens', 'reserved_tokens')
local spent, reserved = tonumber(c[2] or '0'), tonumber(c[3] or '0')
local function left()
  if c[1] then return int(tonumber(c[1]) - spent - reserved) end
  return '-1'
end

local r = redis.call('HGET', KEYS[2], ARGV[1])
if not r then return {left(), '0', '', ''} end
local mark = string.sub(r, 1, 1)
if mark == 'R' or mark == 'Z' then r = string.sub(r, 2) else mark = '' end
local a, b, at, step = string.match(r, '^([^:]*):([^:]*):([^:]*):(.*)$')
if ARGV[5] ~= '' and string.match(at, '^(%d+)') ~= ARGV[5] then return {left(), '0', '', ''} end
local est_nanos, est_tokens = tonumber(a), tonumber(b)
local tenant_day = string.match(at, '@(%d+)$')
redis.call('HDEL', KEYS[2], ARGV[1])

local actual_nanos = tonumber(ARGV[2])
local actual_tokens = tonumber(ARGV[3])
local spent_tokens, reserved_tokens = tonumber(c[4] or '0'), tonumber(c[5] or '0')
if mark == 'R' then
  -- The reaper moved the whole reservation into spend; give back what was not used.
  spent = spent + actual_nanos - est_nanos
  spent_tokens = spent_tokens + actual_tokens - est_tokens
elseif mark == 'Z' then
  -- Closed at nothing when its lease ran out; the owner was alive after all.
  spent = spent + actual_nanos
  spent_tokens = spent_tokens + actual_tokens
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
-- Every mark leaves the tenant's counter holding the estimate, so the correction is the same.
if tenant_day and tenant_day == string.match(KEYS[5], ':(%d+)$') and redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('INCRBY', KEYS[5], int(actual_nanos - est_nanos))
end

if ARGV[6] ~= '' then
  local h = redis.call('HMGET', KEYS[6], 'state', 'rid')
  if h[1] == 'pending' and h[2] == ARGV[1] then
    if ARGV[6] == 'free' then
      redis.call('DEL', KEYS[6])
    else
      redis.call('HSET', KEYS[6], 'state', 'done', 'status', ARGV[7], 'headers', ARGV[8], 'body', ARGV[9])
      if ARGV[10] ~= '' then redis.call('HSET', KEYS[6], 'enc', ARGV[10]) end
      if ARGV[12] == '1' then redis.call('HSET', KEYS[6], 'left', left()) end
      redis.call('PEXPIRE', KEYS[6], tonumber(ARGV[11]))
    end
  end
end

local seq, id = journal_append(KEYS[3], KEYS[4], ARGV[13], step, 14)
return {left(), seq, id, step}
