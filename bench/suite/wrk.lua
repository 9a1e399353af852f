-- wrk script for bench/suite: POST the body in $BENCH_BODY with the headers in
-- $BENCH_HEADERS ("name: value" lines), then print one JSON summary line.
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
for line in (os.getenv("BENCH_HEADERS") or ""):gmatch("[^\n]+") do
  local name, value = line:match("^([^:]+):%s*(.*)$")
  wrk.headers[name] = value
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\n{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"mean_us":%.1f,"max_us":%d',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout, latency.mean, latency.max))
  for _, p in ipairs({50, 90, 99, 99.9}) do
    io.write(string.format(',"p%s_us":%d', tostring(p), latency:percentile(p)))
  end
  io.write("}\n")
end
