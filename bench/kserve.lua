-- wrk script: POST a prepared KServe v2 binary-extension request (bench/knn.sh makes it).
-- Arguments: the body file, the length of its JSON header (Inference-Header-Content-Length),
-- and optionally D > 0: each connection waits D ms before each request (paced load).
function init(args)
  local f = assert(io.open(args[1], "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/octet-stream"
  wrk.headers["Inference-Header-Content-Length"] = args[2]
  pace = tonumber(args[3] or "0")
  if pace > 0 then
    delay = function() return pace end
  end
end

-- Count answers that are not 200: a benchmark of errors is no benchmark.
bad = 0
function response(status, headers, body)
  if status ~= 200 then bad = bad + 1 end
end
