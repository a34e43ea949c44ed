-- tenant_reserve_v1: hold a request's worst case against its tenant's limits, in the
-- tenant's own slot ({ten:NAME}), before the session's reserve runs in the session's slot.
-- The day's spend counter counts holds as spent, so the cap is checked against spend plus
-- every open hold; settle (tenant_settle_v1) corrects a hold to the actual cost. Nothing is
-- written on refusal.
--
-- KEYS: 1 tenant spend of the day, 2 tenant req/min, 3 tenant tok/min, 4 tenant holds
-- ARGV: 1 hold ("session|request"), 2 est_nanos, 3 est_tokens,
--       4 tenant_rpm, 5 tenant_tpm, 6 tenant_usd_day ('' = no limit), 7 day YYYYMMDD

if redis.call('HEXISTS', KEYS[4], ARGV[1]) == 1 then return {'duplicate'} end
local est_nanos, est_tokens = tonumber(ARGV[2]), tonumber(ARGV[3])
local trpm, ttpm, tday = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local function int(n) return string.format('%d', n) end
local function count(key, limit)
  if limit == nil then return 0 end
  return tonumber(redis.call('GET', key) or '0')
end
if trpm and count(KEYS[2], trpm) + 1 > trpm then return {'rate', 'tenant_rpm', int(trpm)} end
if ttpm and count(KEYS[3], ttpm) + est_tokens > ttpm then return {'rate', 'tenant_tpm', int(ttpm)} end
local spent = count(KEYS[1], tday)
if tday and spent + est_nanos > tday then
  return {'budget', 'tenant_usd_day', int(math.max(tday - spent, 0))}
end

local function bump(key, limit, by, ttl_ms)
  if limit ~= nil then redis.call('INCRBY', key, by) redis.call('PEXPIRE', key, ttl_ms) end
end
bump(KEYS[2], trpm, 1, 120000)
bump(KEYS[3], ttpm, est_tokens, 120000)
bump(KEYS[1], tday, est_nanos, 172800000)
-- The hold says which counters it charged (a plan may set some tenant limits and not
-- others): nanos:tokens:day charged or '':req counted (1/0):tokens counted (1/0).
local function flag(limit) if limit then return '1' end return '0' end
local day = ''
if tday then day = ARGV[7] end
redis.call('HSET', KEYS[4], ARGV[1], int(est_nanos) .. ':' .. int(est_tokens) .. ':' .. day .. ':' .. flag(trpm) .. ':' .. flag(ttpm))
return {'ok'}
