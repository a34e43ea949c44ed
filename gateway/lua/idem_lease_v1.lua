-- idem_lease_v1: renew the lease of a pending Idempotency-Key record, only while it is
-- still pending for the request that renews it (a retry may have taken it over).
--
-- KEYS: 1 idempotency record
-- ARGV: 1 request_id, 2 the new lease deadline ms

local h = redis.call('HMGET', KEYS[1], 'state', 'rid')
if h[1] == 'pending' and h[2] == ARGV[1] then
  redis.call('HSET', KEYS[1], 'lease', ARGV[2])
  return 1
end
return 0
