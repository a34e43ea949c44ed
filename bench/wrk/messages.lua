-- Non-streaming Anthropic Messages call (translated to chat for the mock upstream).
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "common.lua")
post("messages")

-- A Response carries `"error":null`; only an error event or object counts as a failure here.
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status < 300 and body and string.find(body, '"type":"error"', 1, true) then
    body_errors = body_errors + 1
  end
end
