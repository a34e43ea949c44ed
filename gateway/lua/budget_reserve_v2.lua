-- budget_reserve_v2: admit one request atomically, or say why not.
-- In one step: session exists, not revoked, not expired; an Idempotency-Key already
-- held (then its record is returned instead); the step machine allows it; rate limits;
-- budget (usd, tokens, requests) and the tenant's daily spend; then the reservation is
-- recorded, the Idempotency-Key marked pending and the request journaled. Nothing is
-- written on refusal.
-- A request id that already holds a reservation is refused ("duplicate"): overwriting it
-- would lock the first reservation's money for good.
-- Reservation value: est_nanos:est_tokens:now_ms[@YYYYMMDD]:step; "@day" says the tenant's
-- spend counter of that day was charged, so settle corrects that counter and no other.
--
-- KEYS: 1 session, 2 reservations, 3 journal, 4 journal_head,
--       5 session req/min, 6 session tok/min, 7 tenant spend today, 8 tenant req/min, 9 tenant tok/min,
--       10 idempotency record (a never-written stand-in when the request has no key)
-- ARGV: 1 now_ms, 2 request_id, 3 est_nanos, 4 est_tokens,
--       5 step candidates ("" = no steps; else "id=pred,pred;id=pred" where "^" is the start),
--       6 session_rpm, 7 session_tpm, 8 tenant_rpm, 9 tenant_tpm, 10 tenant_usd_day ('' = no limit),
--       11 pending ttl ms of the idempotency record ('' = no key), 12 request hash,
--       13 digest of the journal entry, 14.. journal fields (name, value, ...)

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
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return {'duplicate'} end

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

-- A limit that is absent (false from HMGET, '' in ARGV) means no limit.
local function over(limit, used)
  local l = tonumber(limit)
  return l ~= nil and used > l
end
local rpm, tpm = tonumber(ARGV[6]), tonumber(ARGV[7])
local sreq = tonumber(redis.call('GET', KEYS[5]) or '0')
local stok = tonumber(redis.call('GET', KEYS[6]) or '0')
if over(rpm, sreq + 1) then return {'rate', 'session_rpm', tostring(rpm)} end
if over(tpm, stok + est_tokens) then return {'rate', 'session_tpm', tostring(tpm)} end
local trpm, ttpm, tday = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local treq = tonumber(redis.call('GET', KEYS[8]) or '0')
local ttok = tonumber(redis.call('GET', KEYS[9]) or '0')
local tspent = tonumber(redis.call('GET', KEYS[7]) or '0')
if over(trpm, treq + 1) then return {'rate', 'tenant_rpm', tostring(trpm)} end
if over(ttpm, ttok + est_tokens) then return {'rate', 'tenant_tpm', tostring(ttpm)} end
if over(tday, tspent + est_nanos) then
  return {'budget', 'tenant_usd_day', tostring(math.max(tday - tspent, 0))}
end

local committed = tonumber(s[4] or '0') + tonumber(s[5] or '0')
if over(s[3], committed + est_nanos) then
  return {'budget', 'usd', tostring(math.max(tonumber(s[3]) - committed, 0))}
end
local tokens = tonumber(s[7] or '0') + tonumber(s[8] or '0')
if over(s[6], tokens + est_tokens) then
  return {'budget', 'tokens', tostring(math.max(tonumber(s[6]) - tokens, 0))}
end
local requests = tonumber(s[10] or '0')
if over(s[9], requests + 1) then return {'budget', 'requests', '0'} end

-- Admitted: reserve, count, journal.
redis.call('HINCRBY', KEYS[1], 'reserved_nanos', est_nanos)
redis.call('HINCRBY', KEYS[1], 'reserved_tokens', est_tokens)
redis.call('HINCRBY', KEYS[1], 'requests', 1)
local charged = ''
if tday then charged = '@' .. string.match(KEYS[7], ':(%d+)$') end
redis.call('HSET', KEYS[2], ARGV[2], est_nanos .. ':' .. est_tokens .. ':' .. now_ms .. charged .. ':' .. step)
for i, key in ipairs({KEYS[5], KEYS[8]}) do
  redis.call('INCR', key) redis.call('PEXPIRE', key, 120000)
end
for i, key in ipairs({KEYS[6], KEYS[9]}) do
  redis.call('INCRBY', key, est_tokens) redis.call('PEXPIRE', key, 120000)
end
if tday then
  redis.call('INCRBY', KEYS[7], est_nanos) redis.call('PEXPIRE', KEYS[7], 172800000)
end

if ARGV[11] ~= '' then
  redis.call('HSET', KEYS[10], 'state', 'pending', 'req', ARGV[12], 'rid', ARGV[2])
  redis.call('PEXPIRE', KEYS[10], tonumber(ARGV[11]))
end

local seq = redis.call('HINCRBY', KEYS[4], 'seq', 1)
local prev = redis.call('HGET', KEYS[4], 'hash') or ''
local h = redis.sha1hex(prev .. '|' .. seq .. '|' .. ARGV[13] .. '|' .. step)
redis.call('HSET', KEYS[4], 'hash', h)
local xadd = {'XADD', KEYS[3], '*', 'seq', seq, 'prev', prev, 'hash', h, 'digest', ARGV[13], 'step', step}
for i = 14, #ARGV do xadd[#xadd + 1] = ARGV[i] end
local id = redis.call(unpack(xadd))

local budget = tonumber(s[3])
local left = -1  -- no usd budget
if budget then left = budget - committed - est_nanos end
return {'ok', step, tostring(left), tostring(seq), id}
