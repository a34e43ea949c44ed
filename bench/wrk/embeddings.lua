-- One embedding of a short sentence.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "common.lua")
post("embeddings")
