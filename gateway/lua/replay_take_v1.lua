-- replay_take_v1: match a recorded replay's next call against its recording, and move
-- the cursor past it only when the request hashes agree, so a diverging request can be
-- corrected and sent again.
--
-- KEYS: 1 cursor, 2 recorded calls (list of "request_hash|request entry id|outcome entry id")
-- ARGV: 1 the request's canonical hash
-- Returns {'ok' | 'diverged' | 'end', index, recorded call or ''}.

local i = tonumber(redis.call('GET', KEYS[1]) or '0')
local call = redis.call('LINDEX', KEYS[2], i)
if not call then return {'end', i, ''} end
if string.sub(call, 1, #ARGV[1] + 1) ~= ARGV[1] .. '|' then
  return {'diverged', i, call}
end
redis.call('SET', KEYS[1], i + 1, 'KEEPTTL')
return {'ok', i, call}
