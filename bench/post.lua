-- wrk script: POST the file named by the first script argument as the body.
-- With a second argument D > 0, each connection waits D ms before each request
-- (paced load for latency at a fixed offered rate: about connections / D).
-- With a third argument "batch", it also reports the mean X-Batch header
-- ($gpu_batch_size) of the answers.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local f = assert(io.open(args[1], "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/octet-stream"
  pace = tonumber(args[2] or "0")
  sum, n = 0, 0
  if pace > 0 then
    delay = function() return pace end
  end
  if args[3] == "batch" then
    response = function(status, headers, body)
      local b = tonumber(headers["X-Batch"])
      if b then sum = sum + b; n = n + 1 end
    end
  end
end

function done(summary, latency, requests)
  local s, c = 0, 0
  for _, t in ipairs(threads) do
    s = s + (t:get("sum") or 0)
    c = c + (t:get("n") or 0)
  end
  if c > 0 then
    io.write(string.format("mean_batch %.2f\n", s / c))
  end
end
