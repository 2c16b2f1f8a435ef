-- wrk script for the benchmarks: POSTs a JSON body with extra headers, optionally stops after a
-- number of responses, and prints its results as one JSON line (prefixed WRKJSON) for run.py.
--
-- Environment:
--   BENCH_BODY_FILE     file whose bytes are the request body (required)
--   BENCH_HEADERS       extra headers, one "Name: value" per line
--   BENCH_MAX_REQUESTS  stop each wrk thread after this many responses (0 or unset: run for -d);
--                       the thread then prints WRKMAX so run.py can end wrk (SIGINT) before -d

local body_file = assert(os.getenv("BENCH_BODY_FILE"), "BENCH_BODY_FILE is not set")
local f = assert(io.open(body_file, "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
for line in (os.getenv("BENCH_HEADERS") or ""):gmatch("[^\n]+") do
  local name, value = line:match("^%s*([^:]+):%s*(.-)%s*$")
  if name then wrk.headers[name] = value end
end

local max_requests = tonumber(os.getenv("BENCH_MAX_REQUESTS") or "0") or 0
if max_requests > 0 then
  local seen = 0
  -- defined only when needed: a response() hook costs wrk a little per response
  function response(status, headers, body)
    seen = seen + 1
    if seen == max_requests then
      io.write("WRKMAX\n")
      io.flush()
      wrk.thread:stop()
    end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local parts = {}
  for _, q in ipairs({50, 75, 90, 99, 99.9}) do
    parts[#parts + 1] = string.format('"%s": %d', tostring(q), latency:percentile(q))
  end
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"min": %d, "max": %d, "mean": %.2f, "stdev": %.2f, "p": {%s}}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean, latency.stdev, table.concat(parts, ", ")))
end
