-- plan_version_v1: record a compiled Assembly as its plan's next version, unless it is
-- already the newest one (recompiling the same plan records nothing). The new version's
-- parent is the Assembly of the version before it. One plan's keys share one slot.
--
-- KEYS: 1 versions list, 2 plan sources hash
-- ARGV: 1 assembly id, 2 compiled by (the admin token's label), 3 actor ('' = none),
--       4 now_ms, 5 the plan as the compiler read it (JSON)
-- Returns {1, record} when a version was recorded, {0, head record} when it was the head.

local head = redis.call('LINDEX', KEYS[1], -1)
local parent = nil
if head then
  parent = cjson.decode(head).assembly_id
  if parent == ARGV[1] then return {0, head} end
end
local record = {
  version = redis.call('LLEN', KEYS[1]) + 1,
  assembly_id = ARGV[1],
  parent = parent or cjson.null,
  compiled_by = ARGV[2],
  compiled_at_ms = ARGV[4],
}
if ARGV[3] ~= '' then record.actor = ARGV[3] end
local encoded = cjson.encode(record)
redis.call('RPUSH', KEYS[1], encoded)
redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[5])
return {1, encoded}
