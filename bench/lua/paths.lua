-- GET a random path from a file (one path a line): wrk -s paths.lua URL -- FILE
-- Used for read by id (/fhir/Patient/<id>) and search by token (/fhir/Patient?identifier=...).
local paths = {}
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then paths[#paths + 1] = line end
  end
  math.randomseed(os.time() * 7919 + (tid or 0))
  for _ = 1, 10 do math.random() end
end

function request()
  return wrk.format("GET", paths[math.random(#paths)])
end

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")  -- done(): the report
