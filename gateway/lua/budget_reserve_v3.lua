-- budget_reserve_v3: admit one request atomically, or say why not.
-- In one step: session exists, not revoked, not expired; an Idempotency-Key already
-- held (then its record is returned instead); the step machine allows it; rate limits;
-- budget (usd, tokens, requests), a counted cap (an MCP entry's max_calls) and the tenant's
-- daily spend; then the reservation is recorded, the Idempotency-Key marked pending under
-- its owner's lease and the request journaled. Nothing is written on refusal.
-- A request id that already holds an open reservation is refused ("duplicate"):
-- overwriting it would lock the first reservation's money for good. One that was closed
-- for its owner ("R" or "Z" mark, see budget_close_v1) may be reused: a late settle of the
-- old one names its reserve time and leaves the new one alone.
-- Reservation value: est_nanos:est_tokens:now_ms[@YYYYMMDD]:step; "@day" says the tenant's
-- spend counter of that day was charged, so settle corrects that counter and no other.
--
-- KEYS: 1 session, 2 reservations, 3 journal, 4 journal_head,
--       5 session req/min, 6 session tok/min, 7 tenant spend today, 8 tenant req/min, 9 tenant tok/min,
--       10 idempotency record (a never-written stand-in when the request has no key),
--       11 capped call counters (hash: field -> calls admitted in this session)
-- ARGV: 1 now_ms, 2 request_id, 3 est_nanos, 4 est_tokens,
--       5 step candidates ("" = no steps; else "id=pred,pred;id=pred" where "^" is the start),
--       6 session_rpm, 7 session_tpm, 8 tenant_rpm, 9 tenant_tpm, 10 tenant_usd_day ('' = no limit),
--       11 pending ttl ms of the idempotency record ('' = no key), 12 request hash,
--       13 counter field ('' = none), 14 its cap,
--       15 lease deadline ms of the pending record, 16 owner (the process instance),
--       17 digest of the journal entry, 18.. journal fields (name, value, ...)

local now_ms = tonumber(ARGV[1])
local est_nanos = tonumber(ARGV[3])
local est_tokens = tonumber(ARGV[4])

local s = redis.call('HMGET', KEYS[1], 'status', 'expires_at_ms', 'budget_nanos', 'spent_nanos',
  'reserved_nanos', 'budget_tokens', 'spent_tokens', 'reserved_tokens', 'budget_requests',
  'requests', 'step')
if not s[1] then return {'missing'} end
if s[1] == 'revoked' then return {'revoked'} end
if tonumber(s[2]) <= now_ms then return {'expired'} end

-- A retry (or a concurrent duplicate) of a keyed request: the caller decides from the record.
if ARGV[11] ~= '' then
  local held = redis.call('HGETALL', KEYS[10])
  if #held > 0 then
    local out = {'idem'}
    for i = 1, #held do out[#out + 1] = held[i] end
    return out
  end
end
local prior = redis.call('HGET', KEYS[2], ARGV[2])
if prior then
  local mark = string.sub(prior, 1, 1)
  if mark ~= 'R' and mark ~= 'Z' then return {'duplicate'} end
end

local current = s[11] or ''
local step = ''
if ARGV[5] ~= '' then
  local here = current
  if here == '' then here = '^' end
  for cand in string.gmatch(ARGV[5], '[^;]+') do
    local id, preds = string.match(cand, '^([^=]*)=(.*)$')
    for p in string.gmatch(preds, '[^,]+') do
      if p == here then step = id break end
    end
    if step ~= '' then break end
  end
  if step == '' then return {'step', current} end
end

-- A limit that is absent (false from HMGET, '' in ARGV) means no limit. Counters of a
-- limit that is not set are neither read nor written: most plans set none.
local function over(limit, used)
  local l = tonumber(limit)
  return l ~= nil and used > l
end
local function count(key, limit)
  if limit == nil then return 0 end
  return tonumber(redis.call('GET', key) or '0')
end
local function int(n) return string.format('%d', n) end
local rpm, tpm = tonumber(ARGV[6]), tonumber(ARGV[7])
local trpm, ttpm, tday = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
if over(rpm, count(KEYS[5], rpm) + 1) then return {'rate', 'session_rpm', int(rpm)} end
if over(tpm, count(KEYS[6], tpm) + est_tokens) then return {'rate', 'session_tpm', int(tpm)} end
if over(trpm, count(KEYS[8], trpm) + 1) then return {'rate', 'tenant_rpm', int(trpm)} end
if over(ttpm, count(KEYS[9], ttpm) + est_tokens) then return {'rate', 'tenant_tpm', int(ttpm)} end
local tspent = count(KEYS[7], tday)
if over(tday, tspent + est_nanos) then
  return {'budget', 'tenant_usd_day', int(math.max(tday - tspent, 0))}
end

local reserved = tonumber(s[5] or '0')
local committed = tonumber(s[4] or '0') + reserved
if over(s[3], committed + est_nanos) then
  return {'budget', 'usd', int(math.max(tonumber(s[3]) - committed, 0))}
end
local reserved_tokens = tonumber(s[8] or '0')
local tokens = tonumber(s[7] or '0') + reserved_tokens
if over(s[6], tokens + est_tokens) then
  return {'budget', 'tokens', int(math.max(tonumber(s[6]) - tokens, 0))}
end
local requests = tonumber(s[10] or '0')
if over(s[9], requests + 1) then return {'budget', 'requests', '0'} end
local calls = 0
if ARGV[13] ~= '' then
  calls = tonumber(redis.call('HGET', KEYS[11], ARGV[13]) or '0')
  if over(ARGV[14], calls + 1) then
    return {'budget', 'max_calls', int(math.max(tonumber(ARGV[14]) - calls, 0))}
  end
end

-- Admitted: reserve, count, journal.
redis.call('HSET', KEYS[1], 'reserved_nanos', int(reserved + est_nanos),
  'reserved_tokens', int(reserved_tokens + est_tokens), 'requests', int(requests + 1))
local charged = ''
if tday then charged = '@' .. string.match(KEYS[7], ':(%d+)$') end
redis.call('HSET', KEYS[2], ARGV[2], int(est_nanos) .. ':' .. int(est_tokens) .. ':' .. int(now_ms) .. charged .. ':' .. step)
local function bump(key, limit, by, ttl_ms)
  if limit ~= nil then redis.call('INCRBY', key, by) redis.call('PEXPIRE', key, ttl_ms) end
end
bump(KEYS[5], rpm, 1, 120000)
bump(KEYS[6], tpm, est_tokens, 120000)
bump(KEYS[8], trpm, 1, 120000)
bump(KEYS[9], ttpm, est_tokens, 120000)
bump(KEYS[7], tday, est_nanos, 172800000)

if ARGV[13] ~= '' then
  redis.call('HSET', KEYS[11], ARGV[13], int(calls + 1))
  redis.call('PEXPIREAT', KEYS[11], tonumber(s[2]) + 86400000)
end

if ARGV[11] ~= '' then
  redis.call('HSET', KEYS[10], 'state', 'pending', 'req', ARGV[12], 'rid', ARGV[2], 'owner', ARGV[16], 'lease', ARGV[15])
  redis.call('PEXPIRE', KEYS[10], tonumber(ARGV[11]))
end

local seq, id = journal_append(KEYS[3], KEYS[4], ARGV[17], step, 18)

local budget = tonumber(s[3])
local left = -1  -- no usd budget
if budget then left = budget - committed - est_nanos end
return {'ok', step, int(left), seq, id}
