-- Shared by every script that journals: prepended to each one when it is loaded
-- (see ledger._load_sources), so the chain is computed one way only.
--
-- journal_append(journal, head, digest, step, first): append an entry whose content
-- fields are ARGV[first..] (name, value, ...). The link is
-- sha1(prev | seq | digest | step); gateway/state/entries.py verifies it.
local function journal_append(journal, head, digest, step, first)
  local last = redis.call('HMGET', head, 'seq', 'hash')
  local seq = string.format('%d', tonumber(last[1] or '0') + 1)
  local prev = last[2] or ''
  local h = redis.sha1hex(prev .. '|' .. seq .. '|' .. digest .. '|' .. step)
  redis.call('HSET', head, 'seq', seq, 'hash', h)
  local xadd = {'XADD', journal, '*', 'seq', seq, 'prev', prev, 'hash', h, 'digest', digest, 'step', step}
  for i = first, #ARGV do xadd[#xadd + 1] = ARGV[i] end
  return seq, redis.call(unpack(xadd))
end

