-- Shared by the scenario scripts. post(name) sets the request from bodies/<name>.json
-- (the same files the Python side sends); the Authorization value comes from the
-- BENCH_AUTHORIZATION environment variable so no token shows in a process list.
-- response() counts statuses per thread; done() merges them (each wrk thread has its
-- own Lua state, reached through thread:get) and prints one parseable line.

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"

function post(name)
  local file = assert(io.open(here .. "bodies/" .. name .. ".json", "rb"))
  wrk.method = "POST"
  wrk.body = file:read("*a")
  file:close()
  wrk.headers["Content-Type"] = "application/json"
  local auth = os.getenv("BENCH_AUTHORIZATION")
  if auth and auth ~= "" then
    wrk.headers["Authorization"] = auth
  end
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

statuses = {}
-- A 200 whose body is an OpenAI error (an SSE stream that failed after it started)
-- is not a valid result either.
body_errors = 0

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status < 300 and body and string.find(body, '"error":', 1, true) then
    body_errors = body_errors + 1
  end
end

function done(summary, latency, requests)
  local merged = {}
  local merged_body_errors = 0
  for _, thread in ipairs(threads) do
    for code, n in pairs(thread:get("statuses")) do
      merged[code] = (merged[code] or 0) + n
    end
    merged_body_errors = merged_body_errors + thread:get("body_errors")
  end
  local parts = {}
  for code, n in pairs(merged) do
    table.insert(parts, string.format('"%d":%d', code, n))
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"body_errors":%d,"statuses":{%s},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"stdev":%.1f,"max":%d,' ..
    '"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    merged_body_errors, table.concat(parts, ","),
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
