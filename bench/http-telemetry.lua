-- wrk script: POST telemetry (3 data points) to ThingsBoard's HTTP device API, spreading the
-- requests over DEVICES devices (bench-token-0 .. bench-token-<DEVICES-1>).
local devices = tonumber(os.getenv("DEVICES") or "100")
local n = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  n = n + 1
  local path = "/api/v1/bench-token-" .. (n % devices) .. "/telemetry"
  local body = string.format('{"temperature":%d.5,"humidity":%d,"pressure":%d}', 20 + n % 10, 40 + n % 20, 1000 + n % 7)
  return wrk.format(nil, path, nil, body)
end
