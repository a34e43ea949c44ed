-- Streaming chat completion with usage; wrk reads each SSE response to its end.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "common.lua")
post("stream")
