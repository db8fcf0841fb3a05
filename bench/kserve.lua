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

-- No response() callback: wrk counts answers that are not 2xx/3xx itself ("Non-2xx or 3xx
-- responses", which the scripts read), and a callback makes wrk hand every response to Lua.
