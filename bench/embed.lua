-- wrk script for bench/embed.sh: POST JSON bodies taken in turn from a file of one body a
-- line (each thread starts at its own place in the pool), so the server sees varied texts.
-- Arguments: the bodies file, and optionally D > 0: each connection waits D ms before each
-- request (paced load for latency at a fixed offered rate: about connections / (D + answer)).
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
end

function init(args)
  bodies = {}
  for line in io.lines(args[1]) do
    if #line > 0 then table.insert(bodies, line) end
  end
  assert(#bodies > 0, "no bodies in " .. args[1])
  at = ((id or 1) * 7919) % #bodies
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  local pace = tonumber(args[2] or "0")
  if pace > 0 then
    delay = function() return pace end
  end
end

function request()
  at = at % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[at])
end
